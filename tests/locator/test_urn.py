from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from locator import InvalidUrn, Urn, format_urn, parse_urn

names = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
ids = st.integers(min_value=1, max_value=2**63 - 1).map(str)
steps = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_-]{0,127}\Z")


@given(tenant=names, project=names, execution_id=ids, affinity=st.one_of(st.just(""), names))
def test_execution_urn_round_trip(tenant: str, project: str, execution_id: str, affinity: str) -> None:
    urn = Urn(tenant, project, execution_id, affinity)
    assert parse_urn(format_urn(urn)) == urn


@given(tenant=names, project=names, execution_id=ids, step=steps, attempt=st.integers(1, 10_000))
def test_result_urn_round_trip(tenant: str, project: str, execution_id: str, step: str, attempt: int) -> None:
    urn = Urn(tenant, project, execution_id, "", step, attempt)
    text = format_urn(urn)
    assert text.endswith(f"/results/{step}/{attempt}")
    assert parse_urn(text) == urn


def test_format_examples() -> None:
    assert str(Urn("acme", "web", "42")) == "noetl://acme/web/executions/42"
    assert str(Urn("acme", "web", "42", "eu", "fetch", 1)) == "noetl://acme/web/executions/42/results/fetch/1?affinity=eu"


@pytest.mark.parametrize(
    "text",
    [
        "http://acme/web/executions/42",
        "noetl://acme/web/runs/42",
        "noetl://ACME/web/executions/42",
        "noetl://acme/web/executions/abc",
        "noetl://acme/web/executions/42/results/fetch/0",
        "noetl://acme/web/executions/42?shard=3",
        "noetl://acme/web/executions/42?affinity=a.b",
        "noetl://acme/web/executions/42/results/fetch",
    ],
)
def test_bad_urns_rejected(text: str) -> None:
    with pytest.raises(InvalidUrn):
        parse_urn(text)
