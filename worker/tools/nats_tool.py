"""``tool: nats`` steps: publish the rendered ``data`` as JSON to a subject, or send a request and return the reply.

The subject was checked against the operator's ``NOETL_NATS_SUBJECTS`` and
the reserved subjects by :class:`~worker.tools.kinds.NatsKind`
(at register time when literal, and again after rendering, before this runs).
A publish is flushed to the server before the step succeeds, and its result
is ``{"subject", "bytes"}``; a request's result is the reply's body, decoded
when it is JSON, else its text (``timeout`` seconds at most, else a ``timeout``
error; no responder is a ``no_responders`` error).

A publish is core NATS, at most once per attempt: a retried or redelivered step
publishes again, so a subscriber that must not see a message twice dedupes on
the ``Noetl-Step`` header (``<execution_id>:<step>:<iteration or ->``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec
import nats.errors

from system_playbooks.orchestrate.playbook import NatsTool

if TYPE_CHECKING:
    from worker.tools.runner import ToolContext

__all__ = ["MAX_NATS_DATA", "run_nats"]

MAX_NATS_DATA: Final = 1024 * 1024  # the server's default max_payload


async def run_nats(tool: NatsTool, ctx: ToolContext) -> Any:
    """Publish (or request) ``tool.data`` on ``tool.subject`` with the worker's connection."""
    from worker.tools.runner import ToolError

    nc = ctx.nats
    if nc is None:
        raise ToolError("unsupported", f"nats tool {tool.subject!r}: this runner is not bound to a NATS connection")
    try:
        data = msgspec.json.encode(tool.data)
    except (TypeError, msgspec.EncodeError) as e:
        raise ToolError("bad_args", f"data is not JSON-serializable: {e}") from e
    if len(data) > MAX_NATS_DATA:
        raise ToolError("too_large", f"data is {len(data)} bytes as JSON, more than {MAX_NATS_DATA}")
    iteration = "-" if ctx.iteration is None else str(ctx.iteration)
    headers = {"Content-Type": "application/json", "Noetl-Step": f"{ctx.execution_id}:{ctx.step}:{iteration}",
               "Noetl-Attempt": str(ctx.attempt)}  # fmt: skip
    what = f"nats {'request' if tool.request else 'publish'} {tool.subject}"
    try:
        if not tool.request:
            await nc.publish(tool.subject, data, headers=headers)
            await nc.flush(timeout=tool.timeout)
            return {"subject": tool.subject, "bytes": len(data)}
        reply = await nc.request(tool.subject, data, timeout=tool.timeout, headers=headers)
    except nats.errors.NoRespondersError as e:
        raise ToolError("no_responders", f"{what}: no responder is subscribed") from e
    except (nats.errors.TimeoutError, TimeoutError) as e:
        raise ToolError("timeout", f"{what}: no reply within {tool.timeout} s") from e
    except (nats.errors.Error, OSError) as e:
        raise ToolError("nats_error", f"{what}: {type(e).__name__}: {e}") from e
    body: bytes = reply.data or b""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", errors="replace")
