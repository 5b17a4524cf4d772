"""One way to open a NATS connection: reconnecting forever, with its events logged."""

from __future__ import annotations

from collections.abc import Sequence

import nats
import structlog
from nats.aio.client import Client as NATS

from kernel.errors import KernelError

log = structlog.get_logger("noetl.kernel.connect")


async def connect(
    urls: Sequence[str],
    *,
    name: str,
    connect_timeout: float = 5.0,
    reconnect_wait: float = 0.25,
    initial_attempts: int = 2,
) -> NATS:
    """Connect to the first reachable URL; afterwards reconnect without limit.

    Raises :class:`KernelError` with the URLs when no server answers at first.
    """

    async def on_error(e: Exception) -> None:
        log.warning("nats.error", error=str(e) or type(e).__name__)

    closing: list[NATS] = []

    async def on_disconnect() -> None:
        if not (closing and (closing[0].is_closed or closing[0].is_draining)):
            log.warning("nats.disconnected")

    async def on_reconnect() -> None:
        log.info("nats.reconnected")

    try:
        # A negative limit would make nats-py retry the *first* connect forever: bound it,
        # then lift the limit once connected so later outages are ridden out.
        nc = await nats.connect(
            servers=list(urls),
            name=name,
            connect_timeout=connect_timeout,
            reconnect_time_wait=reconnect_wait,
            max_reconnect_attempts=initial_attempts,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
    except Exception as e:  # nats-py raises several unrelated types for "no server"
        raise KernelError(f"cannot connect to NATS at {', '.join(urls)}: {str(e) or type(e).__name__}") from e
    nc.options["max_reconnect_attempts"] = -1
    closing.append(nc)
    return nc


async def close(nc: NATS) -> None:
    """Close ``nc``; a connection the server already dropped is closed without raising."""
    try:
        await nc.close()
    except (ConnectionError, OSError, RuntimeError) as e:
        # RuntimeError: uvloop refuses to flush into a transport the server already closed.
        log.info("nats.close_after_loss", error=str(e) or type(e).__name__)


def install_uvloop() -> bool:
    """Use uvloop's event loop when it is installed (a dependency everywhere but Windows)."""
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True
