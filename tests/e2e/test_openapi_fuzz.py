"""schemathesis against a live edge: ``noetl-edge up`` (a real nats-server, kernel, workers and edge over HTTP).

The schema is the one the edge serves at ``/api/v1/openapi.json``. Every operation gets a bounded number of
positive and of negative examples, half of them aimed at things that exist (a finished execution, its step,
a registered playbook, a stored credential, a waiting callback's token), so the handlers are reached past
their 404s. Each response must not be a 5xx and must match the schema: a documented status, the documented
content type, a body that validates against the response schema, the documented headers. Generation is
derandomized, so a failure reproduces; the report names the operation, the mode and the request as curl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import EXAMPLES, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TENANT, PROJECT = "fuzz", "api"
PER_OPERATION = 20  # examples per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# An SSE stream of an execution that exists never ends: the stream is fuzzed with made-up ids only (404s);
# tests/edge/test_api_fuzz.py reads real streams through Hypercorn.
ENDLESS = "GET /api/v1/tenants/{tenant}/projects/{project}/executions/{execution_id}/stream"
# A min_seq past what the execution's shard has written waits the bounded 5 s and then answers the documented
# 504 (tests/edge/test_api_readpath.py): aimed at the seeded execution, the fuzzer keeps min_seq within its
# history so that a run stays short; at made-up ids any min_seq is still sent (a 404 without waiting).
_P = "/api/v1/tenants/{tenant}/projects/{project}"
_X = _P + "/executions/{execution_id}"
MUST_REACH = {
    f"POST {_P}/executions", f"GET {_P}/executions", f"GET {_X}", f"GET {_X}/events", f"POST {_X}/events",
    f"POST {_X}/cancel", f"GET {_X}/timeline", f"GET {_X}/steps/{{step}}/result", "POST /api/v1/callbacks/{token}",
    f"GET {_P}/playbooks", f"GET {_P}/playbooks/{{path}}", f"GET {_P}/credentials", f"PUT {_P}/credentials/{{alias}}",
    f"GET {_P}/credentials/{{alias}}", f"DELETE {_P}/credentials/{{alias}}", "GET /api/v1/locate", "GET /healthz",
    "GET /readyz", "GET /metrics",
}  # GET /api/v1/openapi.json is the schema's own URL, which schemathesis leaves out (tests/edge/test_openapi.py)


def _wait_status(client: httpx.Client, execution_id: str, want: str) -> dict[str, Any]:
    url = f"/api/v1/tenants/{TENANT}/projects/{PROJECT}/executions/{execution_id}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.get(url)
        if response.status_code == 200 and response.json()["status"] == want:
            return dict(response.json())
        time.sleep(0.1)
    raise AssertionError(f"execution {execution_id} did not reach {want}: {response.status_code} {response.text[:300]}")


def _seed(stack: Stack) -> dict[str, str]:
    """Things that exist for the fuzzer to aim at: path parameters by name."""
    base = f"/api/v1/tenants/{TENANT}/projects/{PROJECT}"
    auth = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(base_url=stack.http_url, headers=auth, timeout=30) as client:
        for name in ("linear", "callback"):
            text = (EXAMPLES / f"{name}.yaml").read_bytes()
            put = client.put(f"{base}/playbooks/examples/{name}", content=text, headers={"Content-Type": "application/yaml"})
            assert put.status_code in (200, 201), put.text
        done = client.post(f"{base}/executions", json={"playbook": {"path": "examples/linear"}}).json()["execution_id"]
        last_seq = _wait_status(client, done, "COMPLETED")["last_seq"]
        waiting = client.post(f"{base}/executions", json={"playbook": {"path": "examples/callback"}}).json()["execution_id"]
        _wait_status(client, waiting, "WAITING")
        events = client.get(f"{base}/executions/{waiting}/events", params={"limit": 1000}).json()["events"]
        token = next(e["event"]["payload"]["callback_id"] for e in events if e["event"]["type"] == "callback.waiting")
        assert client.put(f"{base}/credentials/api-key", content=b"s3cret-value").status_code == 201
    return {"tenant": TENANT, "project": PROJECT, "execution_id": done, "last_seq": str(last_seq), "step": "first", "path": "examples/linear",
            "alias": "api-key", "token": token}


def _within(last_seq: int) -> Callable[[schemathesis.Case[Any]], schemathesis.Case[Any]]:
    def clamp(case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
        value = (case.query or {}).get("min_seq")
        if isinstance(value, int) and not isinstance(value, bool) and value > last_seq:
            case.query["min_seq"] = 1 + value % last_seq
        return case

    return clamp


def test_schemathesis_every_operation(stack: Stack, tmp_path: Path) -> None:
    known = _seed(stack)
    schema = schemathesis.openapi.from_url(stack.http_url + "/api/v1/openapi.json")  # served without a token
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), [r for r in results if not isinstance(r, Ok)]  # the document loads whole
    assert len(operations) >= 17, [op.label for op in operations]
    session = requests.Session()
    auth = {"Authorization": f"Bearer {stack.token}"}
    failures: dict[str, str] = {}
    calls: dict[str, list[int]] = {}
    lines: list[str] = []

    for op in operations:
        names = {p.name for p in op.path_parameters}
        fixed = {name: known[name] for name in names if name in known}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies = [op.as_strategy(generation_mode=mode)]
            if fixed and op.label != ENDLESS:
                within = _within(int(known["last_seq"]))
                strategies.append(op.as_strategy(generation_mode=mode, path_parameters=fixed).map(within))
            statuses = calls.setdefault(f"{op.label} [{mode.value}]", [])

            @settings(max_examples=PER_OPERATION, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=st.one_of(strategies))
            def run(case: schemathesis.Case[Any]) -> None:
                response = case.call_and_validate(base_url=stack.http_url, session=session, headers=auth,
                                                  checks=CHECKS, timeout=20)
                statuses.append(response.status_code)
                lines.append(f"{response.status_code} {case.method} {response.request.url}")

            try:
                run()
            except Unsatisfiable:
                # Nothing in the operation can be made invalid (no parameters, any JSON body): no negative case.
                assert mode is GenerationMode.NEGATIVE, op.label
            except (Exception, BaseExceptionGroup) as e:  # one operation's failure must not hide another's
                failures[f"{op.label} [{mode.value}]"] = str(e)[:3000]

    report = tmp_path / "schemathesis.txt"
    summary = [f"{k}: {sorted(set(v))} ({len(v)} calls)" for k, v in calls.items()]
    report.write_text("\n".join([*summary, "", *lines]), encoding="utf-8")
    print(f"schemathesis report: {report}")
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items()) + "\n" + stack.proc.logs(20)
    # Past the 404s: each operation aimed at a seeded resource answered 2xx at least once.
    reached = {label.rsplit(" [", 1)[0] for label, v in calls.items() if any(200 <= s < 300 for s in v)}
    assert not MUST_REACH - reached, sorted(MUST_REACH - reached)
