"""Serving the edge with Hypercorn on the running asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.applications import Starlette

from kernel.connect import install_uvloop as install_uvloop


def hypercorn_config(bind: Sequence[str], *, access_log: bool = False) -> Config:
    config = Config()
    config.bind = list(bind)
    config.accesslog = "-" if access_log else None
    config.errorlog = None  # structlog reports; hypercorn's own lines would be unstructured noise
    config.graceful_timeout = 5.0
    config.keep_alive_timeout = 75.0
    return config


async def serve(app: Starlette, bind: Sequence[str], stop: asyncio.Event) -> None:
    """Serve ``app`` until ``stop`` is set."""
    await hypercorn_serve(app, hypercorn_config(bind), shutdown_trigger=stop.wait)  # type: ignore[arg-type]


async def wait_listening(bind: str, *, timeout: float = 30.0) -> None:
    """Return once ``HOST:PORT`` accepts connections (Hypercorn binds after the app's lifespan started)."""
    host, _, port = bind.rpartition(":")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host.strip("[]") or "127.0.0.1", int(port))
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the edge did not start listening on {bind} within {timeout:g}s") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return


