"""Serving the edge with Hypercorn on the running asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.applications import Starlette


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


def install_uvloop() -> bool:
    """Use uvloop when it is installed (it is optional)."""
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True
