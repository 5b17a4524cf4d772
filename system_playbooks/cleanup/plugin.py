"""``system/cleanup``: archive the histories of executions that ended longer ago than the retention.

Its consumer sees only the terminal events (``execution.completed``,
``.failed``, ``.cancelled``), so it meets executions in the order they ended.
An execution is due once ``retention`` has passed since its terminal event's
``ts``. The head of the batch that is not due yet holds the consumer (a
``Retry`` until it is, plus a little slack so that one segment gathers the
executions that fall due together); everything due is archived in one
segment, verified, recorded and purged from the WAL (see
:class:`projector.archive.Archiver`). Redelivery is harmless: what is archived
is skipped.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime

import msgspec

from kernel.host import PluginError, Retry, ShardContext
from projector.fold import WalEvent

DEFAULT_RETENTION = "7d"
# How long past the first due execution the plug-in waits, so that one segment holds what falls due together.
MAX_SLACK_S = 300.0
MAX_WAIT_S = 300.0  # the longest Retry: a changed clock or policy is noticed within this
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
FAULTS_ENV = "NOETL_FAULTS"  # test-only: comma list of cleanup.<point> where the process kills itself


class RetentionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How long ended executions keep their history in the WAL; ``seconds`` None = keep everything."""

    seconds: float | None

    @classmethod
    def parse(cls, text: str) -> RetentionPolicy:
        """``off``, or a number and a unit (s, m, h, d, w): ``30s``, ``1h``, ``7d``.

        >>> RetentionPolicy.parse("7d").seconds, RetentionPolicy.parse("off").seconds
        (604800.0, None)
        """
        value = text.strip().lower()
        if value == "off":
            return cls(seconds=None)
        m = _DURATION.fullmatch(value)
        if m is None or float(m.group(1)) <= 0:
            raise PluginError(
                f"NOETL_HISTORY_RETENTION={text!r} is not a duration: use a positive number and a unit "
                "(s, m, h, d, w), e.g. 7d, 12h, 30s, or 'off' to keep every history in the WAL"
            )
        return cls(seconds=float(m.group(1)) * _UNITS[m.group(2)])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetentionPolicy:
        env = os.environ if env is None else env
        return cls.parse(env.get("NOETL_HISTORY_RETENTION") or DEFAULT_RETENTION)

    @property
    def slack(self) -> float:
        return 0.0 if self.seconds is None else min(MAX_SLACK_S, self.seconds / 10)


def ended_at(event: WalEvent) -> float:
    """The terminal event's time (the producer's ``ts``) in seconds since the epoch."""
    return datetime.fromisoformat(event.env.ts).timestamp()


class CleanupPlugin:
    """Archives due executions; holds the consumer at the first one that is not due yet."""

    def __init__(self, policy: RetentionPolicy | None = None) -> None:
        self.policy = policy or RetentionPolicy.from_env()
        self.faults = {f.removeprefix("cleanup.") for f in os.environ.get(FAULTS_ENV, "").split(",") if f.startswith("cleanup.")}

    async def handle(self, ctx: ShardContext, events: Sequence[WalEvent]) -> None:
        retention = self.policy.seconds
        if retention is None:
            # Held, not acked: turning retention on later archives everything that ended meanwhile.
            raise Retry("history retention is off (NOETL_HISTORY_RETENTION=off)", delay=MAX_WAIT_S)
        now = time.time()
        # The due ones up to the first that is not: purging a message of this batch acks every message delivered
        # before it (AckAll), so nothing this call leaves for later may come before one it archives.
        first_waiting = next((i for i, e in enumerate(events) if ended_at(e) + retention > now), len(events))
        due, waiting = events[:first_waiting], events[first_waiting:]
        if due:
            archiver = ctx.archiver()
            archiver.faults = self.faults
            report = await archiver.archive_executions([(e.env.tenant, e.env.project, e.env.execution_id) for e in due])
            if report.executions:
                ctx.log.info(
                    "history.archived", executions=report.executions, messages=report.messages, segment=report.segment
                )
            if report.unfolded:
                # Archived now, system/project's late write would put a KV entry back for good, and a purge would
                # ack what a kernel consumer holds unacked: wait for them.
                raise Retry(f"{report.unfolded} executions are not handled by system/project or system/orchestrate yet",
                            delay=0.5)  # fmt: skip
        if waiting:
            wait = ended_at(waiting[0]) + retention - now + self.policy.slack  # the first not due holds the rest
            raise Retry(f"{len(waiting)} ended executions are not due yet", delay=max(0.05, min(MAX_WAIT_S, wait)))
