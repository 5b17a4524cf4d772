"""Dead letters: a message that cannot be handled is copied to ``DLQ_<shard>`` with its reason, never dropped.

The copy keeps the message's bytes and its headers except the ``Nats-*`` ones
(the original's expected stream or message id would misdirect it), plus
``Noetl-Dlq-Reason`` (``<reason>: <detail>``, one line, at most 1000
characters), ``Noetl-Dlq-Stream``, ``Noetl-Dlq-Seq``, ``Noetl-Dlq-Subject`` and
``Noetl-Dlq-Consumer``. It is filed under ``dlq.<shard>.<reason>``.
"""

from __future__ import annotations

from typing import Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from locator.subjects import dlq_subject

DLQ_REASON: Final = "Noetl-Dlq-Reason"
DLQ_STREAM: Final = "Noetl-Dlq-Stream"
DLQ_SEQ: Final = "Noetl-Dlq-Seq"
DLQ_SUBJECT: Final = "Noetl-Dlq-Subject"
DLQ_CONSUMER: Final = "Noetl-Dlq-Consumer"


def header_text(text: str, limit: int = 1000) -> str:
    """``text`` on one line, cut to ``limit`` characters (header values cannot carry newlines)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def dead_letter(
    js: JetStreamContext,
    msg: Msg,
    *,
    shard: int,
    stream: str,
    seq: int,
    consumer: str,
    reason: str,
    detail: str,
    msg_id: str,
) -> None:
    """Publish the dead-letter copy of ``msg`` (stream sequence ``seq`` of ``stream``) and wait for its ack.

    ``msg_id`` becomes its ``Nats-Msg-Id``, so filing the same message twice
    inside the DLQ's duplicate window stores it once.
    """
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    headers.update(
        {
            DLQ_REASON: header_text(f"{reason}: {detail}"),
            DLQ_STREAM: stream,
            DLQ_SEQ: str(seq),
            DLQ_SUBJECT: msg.subject,
            DLQ_CONSUMER: consumer,
            "Nats-Msg-Id": msg_id,
        }
    )
    await js.publish(dlq_subject(shard, reason), msg.data or b"", headers=headers)
