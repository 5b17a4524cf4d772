"""Subject, stream and bucket names: the only place these strings are spelled.

>>> wal_subject(3, "acme", "web", "42", "step.exit")
'wal.3.acme.web.42.step.exit'
>>> wal_stream(3)
'WAL_3'
"""

from __future__ import annotations

from typing import NamedTuple

from locator.errors import InvalidSubject
from locator.names import check_execution_id, check_name

CATALOG_BUCKET = "catalog"
LEASES_BUCKET = "leases"
PLUGINS_BUCKET = "plugins"
KEYCHAIN_BUCKET = "keychain"
SCHEDULES_BUCKET = "schedules"
IDEMPOTENCY_BUCKET = "idempotency"


def wal_stream(shard: int) -> str:
    return f"WAL_{shard}"


def cmd_stream(shard: int) -> str:
    return f"CMD_{shard}"


def dlq_stream(shard: int) -> str:
    return f"DLQ_{shard}"


def proj_bucket(shard: int) -> str:
    return f"proj_{shard}"


def proj_stream(shard: int) -> str:
    """The stream behind ``proj_<shard>`` (what ``system/materialize`` consumes: each projection written).

    >>> proj_stream(3), proj_subjects(3)
    ('KV_proj_3', '$KV.proj_3.>')
    """
    return f"KV_{proj_bucket(shard)}"


def proj_subjects(shard: int) -> str:
    """The subjects of ``proj_<shard>``'s stream: ``$KV.proj_<shard>.<execution id>``."""
    return f"$KV.{proj_bucket(shard)}.>"


def hist_bucket(shard: int) -> str:
    """Where an execution's archived history parts are recorded (KV, key = execution id)."""
    return f"hist_{shard}"


def vis_bucket(shard: int) -> str:
    """The visibility index (KV): a summary per hot execution, keyed ``<tenant>.<project>.<day>.<hour>.<id>``."""
    return f"vis_{shard}"


def wal_consumer(consumer: str, shard: int) -> str:
    """The durable name of a system playbook's consumer on ``WAL_<shard>`` (``project`` → ``project_3``)."""
    return f"{consumer}_{shard}"


def wal_subjects(shard: int) -> str:
    """The subject filter a shard's WAL stream captures."""
    return f"wal.{shard}.>"


def cmd_subjects(shard: int) -> str:
    return f"cmd.{shard}.>"


def dlq_subjects(shard: int) -> str:
    return f"dlq.{shard}.>"


def cmd_subject(shard: int, pool: str) -> str:
    return f"cmd.{shard}.{check_name('pool', pool)}"


POOL_CONSUMER_PREFIX = "workers_"


def pool_consumer(pool: str) -> str:
    """The durable consumer every worker of ``pool`` shares on each ``CMD_<shard>`` (filter ``cmd.<shard>.<pool>``).

    >>> pool_consumer("gpu")
    'workers_gpu'
    """
    return POOL_CONSUMER_PREFIX + check_name("pool", pool)


def dlq_subject(shard: int, reason: str) -> str:
    """Dead letters are filed under their reason code (``dlq.<shard>.<reason>``)."""
    return f"dlq.{shard}.{check_name('reason', reason)}"


def subject_prefix(shard: int, tenant: str, project: str) -> str:
    """Every event of ``(tenant, project)`` is published under this prefix."""
    return f"wal.{shard}.{tenant}.{project}"


def wal_subject(shard: int, tenant: str, project: str, execution_id: str, event_type: str) -> str:
    """The subject one event is published to (type may contain dots)."""
    return f"wal.{shard}.{tenant}.{project}.{execution_id}.{event_type}"


def execution_filter(shard: int, tenant: str, project: str, execution_id: str) -> str:
    """Subject filter that selects one execution's whole history."""
    return f"wal.{shard}.{tenant}.{project}.{execution_id}.>"


def ingest_subject(tenant: str, project: str, execution_id: str, event_type: str, affinity: str = "") -> str:
    """Topology-free subject: the server's ``partition()`` mapping moves it onto the shard's WAL.

    >>> ingest_subject("acme", "web", "42", "user.note")
    'in.acme.web.42.user.note'
    >>> ingest_subject("acme", "web", "42", "user.note", affinity="eu")
    'ina.acme.web.eu.42.user.note'
    """
    if affinity:
        return f"ina.{tenant}.{project}.{affinity}.{execution_id}.{event_type}"
    return f"in.{tenant}.{project}.{execution_id}.{event_type}"


def ingest_mappings(shard_count: int) -> dict[str, str]:
    """nats-server subject mappings that rewrite ingest subjects onto WAL subjects.

    ``partition(n, tokens…)`` hashes the concatenated tokens with FNV-1a 32,
    exactly like :func:`locator.shard.shard_for`.
    """
    n = int(shard_count)
    return {
        "in.*.*.*.>": f"wal.{{{{partition({n},1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.>",
        "ina.*.*.*.*.>": (
            f"wal.{{{{partition({n},1,2,3)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(4)}}}}.>"
        ),
    }


class WalSubject(NamedTuple):
    shard: int
    tenant: str
    project: str
    execution_id: str
    type: str


def parse_wal_subject(subject: str) -> WalSubject:
    """Split a WAL event subject into its parts, validating each.

    >>> parse_wal_subject("wal.3.acme.web.42.step.exit").type
    'step.exit'
    """
    parts = subject.split(".", 5)
    if len(parts) != 6 or parts[0] != "wal" or not parts[1].isdigit():
        raise InvalidSubject(
            f"not a WAL event subject: {subject!r} (expected wal.<shard>.<tenant>.<project>.<execution_id>.<type>)"
        )
    try:
        check_name("tenant", parts[2])
        check_name("project", parts[3])
        check_execution_id(parts[4])
    except ValueError as e:
        raise InvalidSubject(f"bad WAL subject {subject!r}: {e}") from e
    return WalSubject(int(parts[1]), parts[2], parts[3], parts[4], parts[5])
