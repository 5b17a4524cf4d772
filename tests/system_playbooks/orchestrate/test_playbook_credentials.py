"""Keychain references in playbooks: ``http`` ``auth`` and ``python`` ``credentials``, checked with path-named errors."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from system_playbooks.orchestrate.playbook import (
    HttpAuth,
    HttpTool,
    Playbook,
    PlaybookError,
    Policy,
    PythonTool,
    credential_refs,
    parse_playbook,
)

POLICY = Policy(python_allow=("examples.tools.",), http_hosts=("api.example.com",))


def doc(*tools: dict[str, Any]) -> dict[str, Any]:
    steps = [{"name": f"s{i}", "tool": tool} for i, tool in enumerate(tools)]
    for i in range(len(steps) - 1):
        steps[i]["next"] = [{"step": f"s{i + 1}"}]
    return {"path": "demo/creds", "version": 1, "steps": steps}


def http(**fields: Any) -> dict[str, Any]:
    return {"kind": "http", "url": "https://api.example.com/v1", **fields}


def python(**fields: Any) -> dict[str, Any]:
    return {"kind": "python", "call": "examples.tools.credentials:reveal", **fields}


def error(document: dict[str, Any]) -> PlaybookError:
    with pytest.raises(PlaybookError) as info:
        parse_playbook(document, policy=POLICY)
    return info.value


def test_auth_and_credentials_parse_and_list_their_aliases_in_document_order() -> None:
    pb = parse_playbook(
        doc(
            {"kind": "noop"},
            http(auth={"type": "bearer", "credential": "api"}),
            python(credentials={"api": "api", "db": "tenant-db"}),
            http(auth={"type": "header", "credential": "key_2", "header": "X-Api-Key"}),
            http(auth={"type": "basic", "credential": "svc"}),
        ),
        policy=POLICY,
    )
    assert pb.steps[1].tool == HttpTool(url="https://api.example.com/v1", auth=HttpAuth(type="bearer", credential="api"))
    assert isinstance(pb.steps[2].tool, PythonTool) and pb.steps[2].tool.credentials == {"api": "api", "db": "tenant-db"}
    assert credential_refs(pb) == [
        ("steps[1].tool.auth.credential", "api"),
        ("steps[2].tool.credentials.api", "api"),
        ("steps[2].tool.credentials.db", "tenant-db"),
        ("steps[3].tool.auth.credential", "key_2"),
        ("steps[4].tool.auth.credential", "svc"),
    ]
    assert [HttpAuth(type=t, credential="a").header_name for t in ("bearer", "basic")] == ["Authorization"] * 2
    # A catalog round trip keeps them (the catalog stores the canonical JSON of the Struct).
    assert msgspec.json.decode(msgspec.json.encode(pb), type=Playbook) == pb


def test_a_playbook_without_credentials_references_none() -> None:
    assert credential_refs(parse_playbook(doc(http(), python()), policy=POLICY)) == []


@pytest.mark.parametrize(
    ("tool", "path", "words"),
    [
        (http(auth={"type": "oauth", "credential": "api"}), "steps[1].tool.auth.type", "oauth"),
        (http(auth={"credential": "api"}), "steps[1].tool.auth", "type"),
        (http(auth={"type": "bearer"}), "steps[1].tool.auth", "credential"),
        (http(auth={"type": "bearer", "credential": "API"}), "steps[1].tool.auth.credential", "invalid credential alias 'API'"),
        (http(auth={"type": "bearer", "credential": "a.b"}), "steps[1].tool.auth.credential", "invalid credential alias"),
        (http(auth={"type": "bearer", "credential": "api", "scope": "x"}), "steps[1].tool.auth", "scope"),
        (http(auth={"type": "header", "credential": "api"}), "steps[1].tool.auth.header", "needs the name of the header"),
        (http(auth={"type": "header", "credential": "api", "header": "X Key"}), "steps[1].tool.auth.header", "invalid header name"),
        (http(auth={"type": "bearer", "credential": "api", "header": "X-Key"}), "steps[1].tool.auth.header", "only type 'header'"),
        (http(auth={"type": "bearer", "credential": "api"}, headers={"authorization": "Bearer {{ workload.t }}"}),
         "steps[1].tool.headers.authorization", "set by auth from the keychain"),
        (http(auth={"type": "header", "credential": "api", "header": "X-Key"}, headers={"x-key": "v"}),
         "steps[1].tool.headers.x-key", "set by auth"),
        (python(credentials={"api": "Bad Alias"}), "steps[1].tool.credentials.api", "invalid credential alias"),
        (python(credentials={"1api": "api"}), "steps[1].tool.credentials", "invalid credential name '1api'"),
        (python(credentials={"api": 3}), "steps[1].tool.credentials[...]", "str"),
        (python(credentials=["api"]), "steps[1].tool.credentials", "object"),
        ({"kind": "noop", "credentials": {"a": "a"}}, "steps[1].tool", "credentials"),
    ],
)
def test_bad_references_are_refused_with_their_path(tool: dict[str, Any], path: str, words: str) -> None:
    e = error(doc({"kind": "noop"}, tool))
    assert e.path == path, str(e)
    assert str(e).startswith(f"{path}: ") and words in str(e)


def test_there_is_no_credentials_namespace_in_templates() -> None:
    e = error(doc(http(headers={"X-Key": "{{ credentials.api }}"})))
    assert e.path == "steps[0].tool.headers.X-Key" and "credentials" in str(e)
    e = error(doc(python(args={"token": "{{ credentials['api'] }}"})))
    assert e.path == "steps[0].tool.args.token" and "credentials" in str(e)
