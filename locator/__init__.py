"""Pure naming and routing functions: shard key, URNs, subjects, ids, topology, envelope.

Nothing here does I/O; every other package builds its names from this one.
"""

from __future__ import annotations

from locator.envelope import (
    DEFAULT_PAYLOAD_CAP,
    Envelope,
    EnvelopeError,
    PayloadTooLarge,
    SubjectMismatch,
    check_subject,
    decode_envelope,
    encode_envelope,
    envelope_from_dict,
    new_event,
    subject_for,
)
from locator.errors import InvalidName, InvalidSubject, InvalidTopology, InvalidUrn, LocatorError
from locator.ids import Snowflake
from locator.names import check_execution_id, check_name
from locator.shard import fnv1a32, shard_for
from locator.topology import Cell, Location, Topology, default_topology, load_topology, topology_from_env
from locator.urn import Urn, format_urn, parse_urn

__all__ = [
    "DEFAULT_PAYLOAD_CAP",
    "Cell",
    "Envelope",
    "EnvelopeError",
    "InvalidName",
    "InvalidSubject",
    "InvalidTopology",
    "InvalidUrn",
    "Location",
    "LocatorError",
    "PayloadTooLarge",
    "Snowflake",
    "SubjectMismatch",
    "Topology",
    "Urn",
    "check_execution_id",
    "check_name",
    "check_subject",
    "decode_envelope",
    "default_topology",
    "encode_envelope",
    "envelope_from_dict",
    "fnv1a32",
    "format_urn",
    "load_topology",
    "new_event",
    "parse_urn",
    "shard_for",
    "subject_for",
    "topology_from_env",
]
