"""The filters of an executions listing, checked the same way for the API (422) and the CLI (exit 2).

>>> q = build_query("acme", "web", statuses=["failed,Running"], since="2026-01-01T00:00:00Z", limit="10")
>>> q.statuses, q.since_id, q.limit
(('RUNNING', 'FAILED'), 0, 10)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from locator.names import INT64_MAX
from projector.listing import NO_ID, ListQuery
from projector.visibility import id_at
from system_playbooks.orchestrate.playbook import PATH_PATTERN

STATUSES = ("PENDING", "RUNNING", "WAITING", "COMPLETED", "FAILED", "CANCELLED")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_PATH = re.compile(PATH_PATTERN)


class BadFilter(ValueError):
    """A filter that is not one (``field`` names it)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def statuses_of(values: Sequence[str]) -> tuple[str, ...]:
    """The statuses asked for: each value one or several, comma-separated, any case."""
    wanted = {v.strip().upper() for raw in values for v in raw.split(",") if v.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown:
        raise BadFilter(f"status {', '.join(unknown)} is not one of {', '.join(STATUSES)}", field="status")
    return tuple(s for s in STATUSES if s in wanted)


def time_bound(name: str, raw: str) -> int:
    """The execution id a ``since``/``until`` value stands for: an id as is, an RFC 3339 time as the first id of its millisecond."""
    if raw.isascii() and raw.isdigit():
        if len(raw) > 19 or int(raw) > INT64_MAX:
            raise BadFilter(f"{name} {raw[:40]!r} is larger than any execution id", field=name)
        return int(raw)
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise BadFilter(
            f"{name} must be an RFC 3339 time with a zone (2026-12-04T18:00:00Z) or an execution id, got {raw[:64]!r}",
            field=name,
        )
    try:
        return id_at(int(at.timestamp() * 1000))
    except (OverflowError, ValueError) as e:
        raise BadFilter(f"{name} {raw[:64]!r} is outside the range of execution ids", field=name) from e


def build_query(
    tenant: str, project: str, *, statuses: Sequence[str] = (), playbook: str | None = None, since: str | None = None,
    until: str | None = None, limit: str | int | None = None,
) -> ListQuery:
    """A checked :class:`~projector.listing.ListQuery`; :class:`BadFilter` naming the filter otherwise."""
    if playbook is not None and (len(playbook) > 255 or not _PATH.fullmatch(playbook)):
        raise BadFilter(f"playbook {playbook[:64]!r} is not a playbook path (such as etl/daily)", field="playbook")
    since_id = time_bound("since", since) if since else 0
    until_id = time_bound("until", until) if until else NO_ID
    if since and until and since_id >= until_id:
        raise BadFilter("since must be before until (since is inclusive, until exclusive)", field="since")
    raw = str(DEFAULT_LIMIT if limit is None or limit == "" else limit)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 4 or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadFilter(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw[:40]!r}", field="limit")
    return ListQuery(tenant=tenant, project=project, statuses=statuses_of(statuses), playbook=playbook or None,
                     since_id=since_id, until_id=until_id, limit=int(raw))  # fmt: skip
