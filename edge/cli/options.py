"""Options several commands share, each with its environment twin."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from locator.topology import DEFAULT_NATS_URL, Topology, topology_from_env

if TYPE_CHECKING:
    from projector.mirror import MirrorSettings
    from projector.objects import ObjectRoot


class UsageError(Exception):
    """A flag or environment variable has a bad value (exit code 2)."""


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {raw!r}") from None


def mirror_settings() -> MirrorSettings:
    """The edge's warm mirror from ``NOETL_EDGE_MIRROR_BYTES`` and ``NOETL_EDGE_MIRROR_MAX_AGE`` (a bad one: exit 2)."""
    from projector.errors import ProjectorError
    from projector.mirror import MirrorSettings

    try:
        return MirrorSettings.from_env(os.environ)
    except ProjectorError as e:
        raise UsageError(str(e)) from None


def default_data_dir() -> Path:
    """``NOETL_DATA_DIR``, else ``$XDG_DATA_HOME/noetl-edge`` (``~/.local/share/noetl-edge``)."""
    # Same as natscluster.server.default_data_dir, which would import structlog into `--help` (a test keeps them equal).
    explicit = os.environ.get("NOETL_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "noetl-edge"


def default_holder() -> str:
    """The lease holder id a kernel takes by default: ``<host>-<pid>``."""
    # Same as kernel.runtime.default_holder, which would import nats into `--help` (a test keeps them equal).
    return f"{socket.gethostname()}-{os.getpid()}".lower().replace(".", "-")


def add_log_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        default=None,
        help="debug, info, warning or error (env NOETL_LOG_LEVEL; default info, but warning for `up` on a terminal)",
    )
    g.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=os.environ.get("NOETL_LOG_FORMAT", "auto"),
        help="auto = JSON when stderr is not a terminal (env NOETL_LOG_FORMAT)",
    )


def log_level(args: argparse.Namespace, *, stderr_is_a_terminal: bool, env: Mapping[str, str] = os.environ) -> str:
    """``--log-level``, else ``NOETL_LOG_LEVEL``, else ``info``; but ``warning`` for ``up`` whose logs go to a terminal.

    On a terminal, ``up``'s start-up logs would scroll its ``ready`` line away from the person who waits for it.

    >>> up = argparse.Namespace(command="up", log_level=None)
    >>> log_level(up, stderr_is_a_terminal=True, env={}), log_level(up, stderr_is_a_terminal=False, env={})
    ('warning', 'info')
    >>> log_level(up, stderr_is_a_terminal=True, env={"NOETL_LOG_LEVEL": "debug"})
    'debug'
    """
    if args.log_level:
        return str(args.log_level)
    if env.get("NOETL_LOG_LEVEL"):
        return env["NOETL_LOG_LEVEL"]
    return "warning" if stderr_is_a_terminal and getattr(args, "command", None) == "up" else "info"


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets: how every long-running command is told to stop (call it in the loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def add_topology_options(p: argparse.ArgumentParser, *, with_url: bool = True) -> None:
    g = p.add_argument_group("topology")
    g.add_argument(
        "--shards", type=int, default=None, metavar="N", help="shard count of the one-cell default topology (env NOETL_SHARDS; default 4)"
    )
    g.add_argument("--topology", metavar="FILE", default=None, help="topology file, YAML or JSON (env NOETL_TOPOLOGY)")
    if with_url:
        g.add_argument(
            "--nats-url",
            default=None,
            metavar="URL",
            help=f"NATS server to connect to (env NOETL_NATS_URL; default {DEFAULT_NATS_URL}, or the topology's first cell)",
        )


def resolve_topology(args: argparse.Namespace) -> Topology:
    env = dict(os.environ)
    if args.topology:
        env["NOETL_TOPOLOGY"] = args.topology
    return topology_from_env(env, shards=args.shards, nats_url=getattr(args, "nats_url", None))


def connect_urls(args: argparse.Namespace, topology: Topology) -> list[str]:
    """``--nats-url`` if given, else the URLs of the topology's first cell."""
    if getattr(args, "nats_url", None):
        return [args.nats_url]
    return list(topology.cells[0].urls)


def objects_root(args: argparse.Namespace) -> ObjectRoot:
    """The object store the kernels use: ``NOETL_OBJECTS_URL``, else ``file://<--data-dir>/objects``."""
    from projector.objects import ObjectRoot  # fsspec only for the commands that read objects, not for --help

    try:
        return ObjectRoot.from_env(data_dir=args.data_dir or default_data_dir())
    except (ValueError, ImportError) as e:
        raise UsageError(f"NOETL_OBJECTS_URL is not an object store this install can open: {e}") from e
