"""Starting an execution: resolve the playbook a start names, then publish its ``execution.requested``.

The edge's start route (``POST …/executions``) and the kernel's schedule
firer start executions the same way, through these two functions (then
:meth:`kernel.producer.Producer.publish`): what runs
is the registered version checked here (versions are immutable), and the
event's payload is ``{"playbook": {"path", "version"} | null, "workload": {…}}``
plus whatever ``extra`` names (a schedule's tick, say).
"""

from __future__ import annotations

from typing import Any, Protocol

from locator.envelope import Envelope, envelope_from_dict
from system_playbooks.orchestrate.catalog import PlaybookNotFound


class UnknownPlaybook(PlaybookNotFound):
    """The start names a path or a version the catalog does not hold; ``field`` says which."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class Versions(Protocol):
    """What resolving needs of a catalog: a :class:`Catalog`, or the edge's :class:`~.latest.LatestVersions`."""

    async def latest_version(self, tenant: str, project: str, path: str) -> int: ...

    async def has_version(self, tenant: str, project: str, path: str, version: int) -> bool: ...


async def resolve_playbook(catalog: Versions, tenant: str, project: str, path: str, version: int | None) -> dict[str, Any]:
    """The registered version that ``(path, version)`` names (the latest when None), as ``{"path", "version"}``.

    The playbook itself is not read: ``latest`` is moved only after its version is written, so it names one
    that exists, and an explicit version is only looked up. Raises :class:`UnknownPlaybook` with ``field``
    ``playbook.path`` (no such playbook) or ``playbook.version`` (no such version).
    """
    try:
        if version is not None and await catalog.has_version(tenant, project, path, version):
            return {"path": path, "version": version}
        latest = await catalog.latest_version(tenant, project, path)
    except PlaybookNotFound as e:
        raise UnknownPlaybook(f"{e}: register it first (PUT .../playbooks/{path})", field="playbook.path") from e
    if version is None:
        return {"path": path, "version": latest}
    raise UnknownPlaybook(
        f"no version {version} of playbook {path} in {tenant}/{project} (the latest is version {latest})",
        field="playbook.version",
    )


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

