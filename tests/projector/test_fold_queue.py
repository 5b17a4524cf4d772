"""The fold's view of worker pools: a step's ``pool`` and the commands it has ``queued`` there, unclaimed."""

from __future__ import annotations

from typing import Any

import msgspec

from locator.envelope import Envelope, new_event
from projector.fold import WalEvent, fold
from projector.projection import Projection, canonical
from projector.timeline import summarize


def ev(type: str, step: str, attempt: int = 1, **payload: Any) -> Envelope:
    return new_event(tenant="acme", project="web", execution_id="7", type=type, step=step, attempt=attempt,
                     payload=payload)


def issued(step: str, iteration: int | None = None, attempt: int = 1, pool: str | None = "gpu") -> Envelope:
    cid = f"7:{step}:{'-' if iteration is None else iteration}:{attempt}"
    extra = {} if pool is None else {"pool": pool}
    return ev("command.issued", step, attempt, command_id=cid, iteration=iteration, kind="python", **extra)


def claimed(step: str, iteration: int | None = None, delivery: int = 1) -> Envelope:
    cid = f"7:{step}:{'-' if iteration is None else iteration}:1"
    return ev("command.claimed", step, delivery, command_id=cid, iteration=iteration, delivery=delivery,
              worker="w1", pool="gpu")


def folded(*envs: Envelope) -> Projection:
    p = fold(None, [WalEvent(n, e) for n, e in enumerate(envs, 1)])
    assert p is not None
    one_by_one: Projection | None = None
    for n, e in enumerate(envs, 1):  # each event twice, one at a time: the same projection
        one_by_one = fold(one_by_one, [WalEvent(n, e), WalEvent(n, e)])
    assert one_by_one is not None and canonical(one_by_one) == canonical(p)
    return p


def test_an_issued_command_is_queued_for_its_pool_until_a_worker_claims_it() -> None:
    waiting = folded(ev("step.enter", "train"), issued("train"))
    step = waiting.steps["train"]
    assert (step.status, step.pool, step.queued) == ("RUNNING", "gpu", 1)
    assert b'"queued":1' in canonical(waiting) and b'"pool":"gpu"' in canonical(waiting)
    running = folded(ev("step.enter", "train"), issued("train"), claimed("train")).steps["train"]
    assert (running.status, running.pool, running.queued) == ("RUNNING", "gpu", msgspec.UNSET)


def test_a_redelivered_claim_is_the_same_command_not_one_more_off_the_queue() -> None:
    # A loop of three on gpu: one claimed, its worker killed, the command claimed again (delivery 2).
    envs = [ev("step.enter", "sq"), *(issued("sq", i) for i in range(3)), claimed("sq", 0)]
    assert folded(*envs).steps["sq"].queued == 2
    assert folded(*envs, claimed("sq", 0, delivery=2)).steps["sq"].queued == 2
    assert folded(*envs, claimed("sq", 1), claimed("sq", 2)).steps["sq"].queued is msgspec.UNSET


def test_the_step_s_end_clears_its_queue() -> None:
    exit_ = ev("step.exit", "train", result=1, iteration=None, command_id="7:train:-:1")
    done = folded(ev("step.enter", "train"), issued("train"), exit_).steps["train"]
    assert (done.status, done.pool, done.queued) == ("COMPLETED", "gpu", msgspec.UNSET)
    failed = folded(ev("step.enter", "train"), issued("train"), ev("step.failed", "train", error={"type": "x"}))
    assert failed.steps["train"].queued is msgspec.UNSET


def test_a_retry_is_queued_again() -> None:
    envs = [ev("step.enter", "t"), issued("t"), claimed("t"), ev("call.error", "t", error={"type": "x"}),
            ev("step.retry", "t", 2), issued("t", attempt=2, pool="cpu")]
    step = folded(*envs).steps["t"]
    assert (step.status, step.pool, step.queued, step.attempts) == ("RUNNING", "cpu", 1, 2)


def test_events_issued_before_pools_fold_as_before() -> None:
    p = folded(ev("step.enter", "a"), issued("a", pool=None))
    assert (p.steps["a"].pool, p.steps["a"].queued) == (msgspec.UNSET, msgspec.UNSET)
    assert b"queued" not in canonical(p) and b"pool" not in canonical(p)


def test_the_timeline_says_which_pool_a_command_waits_in_and_which_worker_took_it() -> None:
    assert summarize(issued("train")) == "python command 7:train:-:1, queued for pool gpu"
    assert summarize(claimed("train")) == "claimed 7:train:-:1 by w1 in pool gpu"
    assert summarize(issued("train", pool=None)) == "python command 7:train:-:1"
