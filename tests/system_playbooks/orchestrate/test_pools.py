"""Worker pools: a step's ``pool`` is checked at register time and routes its commands (no NATS here).

The e2e test (tests/e2e/test_pools.py) runs the same routing through real kernel and worker processes.
"""

from __future__ import annotations

from typing import Any

import pytest

from locator.command import DEFAULT_POOL, Command, command_decoder, command_encoder
from locator.envelope import new_event, now_ts
from system_playbooks.orchestrate.planner import plan
from system_playbooks.orchestrate.playbook import PlaybookError, Policy, parse_playbook
from system_playbooks.orchestrate.state import apply, new_state

POLICY = Policy(python_allow=("examples.tools.",))


def doc(*steps: dict[str, Any]) -> dict[str, Any]:
    chained = [dict(s, next=[{"step": steps[i + 1]["name"]}]) if i + 1 < len(steps) else s for i, s in enumerate(steps)]
    return {"path": "t/pools", "version": 1, "steps": chained}


def noop(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": {"kind": "noop", "result": name}, **extra}


def refused(*steps: dict[str, Any]) -> PlaybookError:
    with pytest.raises(PlaybookError) as info:
        parse_playbook(doc(*steps), policy=POLICY)
    return info.value


def first_commands(*steps: dict[str, Any]) -> tuple[list[Command], list[dict[str, Any]]]:
    """The start step's commands and the payloads of its ``command.issued`` events."""
    playbook = parse_playbook(doc(*steps), policy=POLICY)
    request = new_event(tenant="acme", project="web", execution_id="7", type="execution.requested",
                        payload={"playbook": {"path": "t/pools"}, "workload": {}})
    state = new_state(request)
    apply(state, 1, request)
    decided = plan(state, playbook, now_ms=0, new_token=lambda: "secret-0000000000000")
    issued = [e.payload for e in decided.events if e.type == "command.issued"]
    return decided.commands, issued


def test_a_step_without_a_pool_goes_to_the_shared_pool() -> None:
    playbook = parse_playbook(doc(noop("a")), policy=POLICY)
    assert (playbook.steps[0].pool, playbook.steps[0].worker_pool) == (None, DEFAULT_POOL)
    commands, issued = first_commands(noop("a"))
    assert [c.pool for c in commands] == ["shared"]
    assert issued == [{"command_id": "7:a:-:1", "iteration": None, "kind": "noop", "pool": "shared"}]


def test_a_pinned_step_sends_its_commands_to_its_pool_and_says_so_in_command_issued() -> None:
    commands, issued = first_commands(noop("a", pool="gpu"), noop("b", pool="cpu"))
    assert [(c.step, c.pool) for c in commands] == [("a", "gpu")]
    assert [p["pool"] for p in issued] == ["gpu"]


def test_every_iteration_of_a_pinned_loop_goes_to_the_pool() -> None:
    loop = {"name": "sq", "pool": "gpu", "loop": {"over": "[1, 2, 3]"},
            "tool": {"kind": "python", "call": "examples.tools.math:multiply", "args": {"a": "{{ item }}", "b": 2}}}
    commands, issued = first_commands(loop)
    assert [(c.iteration, c.pool) for c in commands] == [(0, "gpu"), (1, "gpu"), (2, "gpu")]
    assert [p["pool"] for p in issued] == ["gpu"] * 3


def test_the_pool_travels_in_the_command_and_an_older_command_without_one_is_shared() -> None:
    commands, _ = first_commands(noop("a", pool="gpu-a100"))
    assert command_decoder.decode(command_encoder.encode(commands[0])).pool == "gpu-a100"
    older = {"v": 1, "command_id": "7:a:-:1", "execution_id": "7", "tenant": "acme", "project": "web", "affinity": "",
             "step": "a", "iteration": None, "attempt": 1, "tool": {"kind": "noop"}, "issued_ts": now_ts()}
    assert command_decoder.decode(command_encoder.encode(older)).pool == "shared"


@pytest.mark.parametrize(("pool", "message"), [
    ("GPU", "invalid pool 'GPU': must match"),
    ("gpu.a100", "invalid pool 'gpu.a100': must match"),
    ("gpu*", "invalid pool 'gpu*': must match"),
    ("", "invalid pool '': must match"),
    ("x" * 64, "invalid pool 'xxx"),
    ("timer", "pool 'timer' is reserved for the kernel's scheduler"),
])
def test_a_pool_that_is_not_a_subject_token_or_is_reserved_is_refused_with_its_path(pool: str, message: str) -> None:
    error = refused(noop("a"), noop("b", pool=pool))
    assert error.path == "steps[1].pool"
    assert str(error).startswith(f"steps[1].pool: {message}")


def test_a_pool_that_is_not_a_string_is_refused_with_its_path() -> None:
    error = refused(noop("a", pool=5))
    assert str(error).startswith("steps[0].pool: expected `str | null`, got `int`")


@pytest.mark.parametrize("tool", [{"kind": "callback"}, {"kind": "playbook", "path": "t/child"}])
def test_a_step_that_runs_on_no_worker_takes_no_pool(tool: dict[str, Any]) -> None:
    error = refused(noop("a"), {"name": "b", "tool": tool, "pool": "gpu"})
    assert str(error) == f"steps[1].pool: a {tool['kind']} step runs on no worker: it takes no pool"
