"""Starting an execution: resolve the playbook a start names, then publish its ``execution.requested``.

The edge's start route (``POST …/executions``) and the kernel's schedule
firer start executions the same way, through these two functions (then
:meth:`kernel.producer.Producer.publish`): what runs
is the registered version checked here (versions are immutable), and the
event's payload is ``{"playbook": {"path", "version"} | null, "workload": {…}}``
plus whatever ``extra`` names (a schedule's tick, say).
"""

from __future__ import annotations

from typing import Any

from locator.envelope import Envelope, envelope_from_dict
from system_playbooks.orchestrate.catalog import Catalog, PlaybookNotFound


class UnknownPlaybook(PlaybookNotFound):
    """The start names a path or a version the catalog does not hold; ``field`` says which."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


async def resolve_playbook(catalog: Catalog, tenant: str, project: str, path: str, version: int | None) -> dict[str, Any]:
    """The registered version that ``(path, version)`` names (the latest when None), as ``{"path", "version"}``.

    Raises :class:`UnknownPlaybook` with ``field`` ``playbook.path`` (no such playbook) or
    ``playbook.version`` (no such version).
    """
    try:
        latest = await catalog.latest_version(tenant, project, path)
    except PlaybookNotFound as e:
        raise UnknownPlaybook(f"{e}: register it first (PUT .../playbooks/{path})", field="playbook.path") from e
    try:
        playbook = await catalog.get(tenant, project, path, latest if version is None else version)
    except PlaybookNotFound as e:
        raise UnknownPlaybook(f"{e} (the latest is version {latest})", field="playbook.version") from e
    return {"path": playbook.path, "version": playbook.version}


def requested_event(
    *,
    tenant: str,
    project: str,
    affinity: str,
    execution_id: str,
    playbook: dict[str, Any] | None,
    workload: dict[str, Any],
    event_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Envelope:
    """The validated ``execution.requested`` envelope of a start (a fresh ``event_id`` unless given)."""
    doc: dict[str, Any] = {
        "tenant": tenant,
        "project": project,
        "affinity": affinity,
        "execution_id": execution_id,
        "type": "execution.requested",
        "payload": {"playbook": playbook, "workload": workload, **(extra or {})},
    }
    if event_id is not None:
        doc["event_id"] = event_id
    return envelope_from_dict(doc, fill=True)

