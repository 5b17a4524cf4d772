"""``noetl://`` URNs for executions and their results."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from locator.errors import InvalidUrn
from locator.names import check_execution_id, check_name, check_step

SCHEME = "noetl"


class Urn(NamedTuple):
    """An execution URN, optionally pointing at one step attempt's result.

    >>> u = Urn("acme", "web", "42")
    >>> str(u)
    'noetl://acme/web/executions/42'
    >>> parse_urn(str(u._replace(affinity="eu", step="fetch", attempt=2)))
    Urn(tenant='acme', project='web', execution_id='42', affinity='eu', step='fetch', attempt=2)
    """

    tenant: str
    project: str
    execution_id: str
    affinity: str = ""
    step: str | None = None
    attempt: int | None = None

    def __str__(self) -> str:
        return format_urn(self)


def format_urn(urn: Urn) -> str:
    check_name("tenant", urn.tenant)
    check_name("project", urn.project)
    check_name("affinity", urn.affinity, allow_empty=True)
    check_execution_id(urn.execution_id)
    text = f"{SCHEME}://{urn.tenant}/{urn.project}/executions/{urn.execution_id}"
    if urn.step is not None or urn.attempt is not None:
        if urn.step is None or urn.attempt is None or urn.attempt < 1:
            raise InvalidUrn("a result URN needs both a step and an attempt >= 1")
        check_step(urn.step)
        text += f"/results/{urn.step}/{urn.attempt}"
    if urn.affinity:
        text += f"?affinity={urn.affinity}"
    return text


def parse_urn(text: str) -> Urn:
    """Parse an execution or result URN; raise :class:`InvalidUrn` naming what is wrong."""
    parts = urlsplit(text)
    if parts.scheme != SCHEME:
        raise InvalidUrn(f"not a noetl URN: {text!r} (expected noetl://<tenant>/<project>/executions/<id>)")
    segments = parts.path.split("/")
    # netloc is the tenant; path is /<project>/executions/<id>[/results/<step>/<attempt>]
    if len(segments) not in (4, 7) or segments[0] != "" or segments[2] != "executions":
        raise InvalidUrn(f"malformed URN path in {text!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"affinity"}
    if unknown:
        raise InvalidUrn(f"unknown URN query parameter(s) {sorted(unknown)} in {text!r}")
    affinity = query.get("affinity", [""])[-1]
    step: str | None = None
    attempt: int | None = None
    if len(segments) == 7:
        if segments[4] != "results" or not segments[6].isdigit() or int(segments[6]) < 1:
            raise InvalidUrn(f"malformed result URN {text!r}")
        step, attempt = segments[5], int(segments[6])
    try:
        urn = Urn(parts.netloc, segments[1], segments[3], affinity, step, attempt)
        format_urn(urn)
    except InvalidUrn:
        raise
    except ValueError as e:
        raise InvalidUrn(f"bad URN {text!r}: {e}") from e
    return urn
