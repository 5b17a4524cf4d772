"""Wire contracts between the orchestrator, the data workers and the kernel's scheduler.

A ``Command`` asks a data worker to run one tool once. It is published to
``cmd.<shard>.<pool>`` (stream ``CMD_<shard>``, work-queue retention) with
``Nats-Msg-Id`` = :attr:`Command.command_id`, so issuing the same command again
inside the duplicate window stores nothing.

A ``Timer`` asks the scheduler to publish one prepared WAL event at
``due_ms``; it is published to ``cmd.<shard>.timer`` (``timer`` is a reserved
pool name).

>>> command_id("7", "fetch", None, 1)
'7:fetch:-:1'
>>> command_id("7", "square", 3, 2)
'7:square:3:2'
>>> token = callback_token("acme", "web", "", "7:approve:-:1", "s3cret-s3cret-s3cret")
>>> parse_callback_token(token)
CallbackAddress(tenant='acme', project='web', affinity='', command_id='7:approve:-:1', execution_id='7', step='approve', iteration=None, attempt=1)
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Final, NamedTuple

import msgspec

from locator.names import check_name, check_step

COMMAND_VERSION: Final = 1
TIMER_POOL: Final = "timer"
DEFAULT_POOL: Final = "shared"


def command_id(execution_id: str, step: str, iteration: int | None, attempt: int) -> str:
    """``<execution>:<step>:<iteration>:<attempt>``; ``-`` stands for "not a loop iteration"."""
    return f"{execution_id}:{step}:{'-' if iteration is None else iteration}:{attempt}"


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """Run ``tool`` (a playbook tool with its args already rendered) for one step attempt.

    A worker reports back on the execution's WAL subject: ``command.claimed``
    when it starts, then ``step.exit`` (``command.completed`` for one
    iteration of a loop) with the result, or ``call.error``. Every event it
    publishes carries ``attempt = attempt + deliveries - 1``: a command
    redelivered after a worker died is a new attempt of the step.
    """

    v: int
    command_id: str
    execution_id: str
    tenant: str
    project: str
    affinity: str
    step: str
    iteration: int | None
    attempt: int
    tool: dict[str, Any]
    timeout: float | None = None
    issued_ts: str = ""
    # The pool it was issued to (its subject's last token); absent from commands issued before pools.
    pool: str = DEFAULT_POOL


class Timer(msgspec.Struct, frozen=True, kw_only=True):
    """Publish ``data`` (an encoded envelope) to ``subject`` with ``Nats-Msg-Id: msg_id`` at ``due_ms``."""

    due_ms: int
    subject: str
    msg_id: str
    data: bytes


command_encoder: Final = msgspec.json.Encoder()
command_decoder: Final = msgspec.json.Decoder(Command)
timer_decoder: Final = msgspec.json.Decoder(Timer)


class CallbackAddress(NamedTuple):
    """Where a callback token points: the execution and the waiting command."""

    tenant: str
    project: str
    affinity: str
    command_id: str
    execution_id: str
    step: str
    iteration: int | None
    attempt: int


_SECRET_RE: Final = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_COMMAND_RE: Final = re.compile(r"^([1-9][0-9]{0,18}):([^:]+):(-|0|[1-9][0-9]*):([1-9][0-9]*)$")


def callback_token(tenant: str, project: str, affinity: str, command_id: str, secret: str) -> str:
    """A one-time callback token: the waiting command's address (readable) and a secret (``base64url.secret``)."""
    head = base64.urlsafe_b64encode(f"{tenant}/{project}/{affinity}/{command_id}".encode()).rstrip(b"=")
    return f"{head.decode()}.{secret}"


def parse_callback_token(token: str) -> CallbackAddress:
    """The address in ``token``; ``ValueError`` naming the problem if it is not a callback token."""
    head, dot, secret = token.partition(".")
    if not dot or not _SECRET_RE.fullmatch(secret) or len(head) > 512:
        raise ValueError("not a callback token")
    try:
        text = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not a callback token") from None
    parts = text.split("/")
    match = _COMMAND_RE.fullmatch(parts[3]) if len(parts) == 4 else None
    if match is None:
        raise ValueError("not a callback token")
    execution_id, step, iteration, attempt = match.groups()
    try:
        check_name("tenant", parts[0])
        check_name("project", parts[1])
        check_name("affinity", parts[2], allow_empty=True)
        check_step(step)
    except ValueError:
        raise ValueError("not a callback token") from None
    return CallbackAddress(
        parts[0], parts[1], parts[2], parts[3], execution_id, step,
        None if iteration == "-" else int(iteration), int(attempt),
    )
