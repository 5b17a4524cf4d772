"""``noetl-edge run --wait`` says when a pinned step's command waits in its pool and which worker took it."""

from __future__ import annotations

from typing import Any

from edge.cli.run import _line
from locator.envelope import new_event


def ev(type: str, **payload: Any) -> Any:
    return new_event(tenant="acme", project="web", execution_id="7", type=type, step="train", attempt=2, payload=payload)


def test_a_pinned_step_s_queue_and_claim_get_a_line_and_the_shared_pool_s_do_not() -> None:
    issued = ev("command.issued", command_id="7:train:-:2", iteration=None, kind="python", pool="gpu")
    assert _line(5, issued) == "step train QUEUED pool=gpu command=7:train:-:2"
    claimed = ev("command.claimed", command_id="7:train:-:2", iteration=None, delivery=1, worker="w-9", pool="gpu")
    assert _line(6, claimed) == "step train CLAIMED pool=gpu worker=w-9 attempt=2"
    for shared in (ev("command.issued", command_id="7:a:-:1", kind="noop", pool="shared"),
                   ev("command.claimed", command_id="7:a:-:1", delivery=1, worker="w-9", pool="shared"),
                   ev("command.issued", command_id="7:a:-:1", kind="noop")):
        assert _line(7, shared) is None
