"""The embedded ``nats-server``: config from the topology, start, health wait, clean stop."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import structlog

from kernel.errors import ServerStartError
from natscluster.natsbin import find_nats_server
from natscluster.natsconf import render_server_config
from locator.topology import Topology

log = structlog.get_logger("noetl.natscluster.server")

BIND_ATTEMPTS = 3  # starts on freshly chosen ports when one chosen here was taken before the server bound it
_TAKEN = re.compile(r"listen tcp [^\s]*:(\d+): bind: address already in use")


class _PortTaken(Exception):
    """nats-server exited at start-up because ``port`` was taken."""

    def __init__(self, port: int, code: int | None, tail: str) -> None:
        super().__init__(port)
        self.port, self.code, self.tail = port, code, tail


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    # Linux only: the server gets SIGTERM if the process that started it dies (even by SIGKILL).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedServer:
    """A ``nats-server`` child process with JetStream, owned by this process.

    Start it from the main thread (the child is tied to the starting thread's
    lifetime on Linux).

    >>> import tempfile
    >>> from kernel.logs import configure_logging
    >>> from locator import default_topology
    >>> configure_logging(level="warning")
    >>> with EmbeddedServer(data_dir=tempfile.mkdtemp(), topology=default_topology(), port=0) as srv:
    ...     srv.url.startswith("nats://127.0.0.1:")
    True
    """

    def __init__(
        self,
        *,
        data_dir: str | Path,
        topology: Topology,
        host: str = "127.0.0.1",
        port: int = 4222,
        monitor_port: int = 0,
        server_name: str = "noetl-local",
        binary: str | Path | None = None,
        max_payload: int = 1024 * 1024,
        sync_interval: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.topology = topology
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.server_name = server_name
        self.binary = Path(binary) if binary else None
        self.max_payload = max_payload
        self.sync_interval = sync_interval
        self.process: subprocess.Popen[bytes] | None = None
        # False for servers meant to outlive their starter (`noetl-edge cluster up`).
        self.die_with_parent = True

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats" / "server.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats" / "server.log"

    def start(self, *, timeout: float = 20.0) -> None:
        """Write the config, start the server and wait until ``/healthz`` reports JetStream ready.

        A port chosen here (``port=0``, ``monitor_port=0``) was free a moment before the server binds it;
        another process may take it in between. The server then exits at once saying so, and is started
        again on other ports (``BIND_ATTEMPTS`` in all). A port the caller named is never changed.
        """
        binary = self.binary or find_nats_server()
        chosen_port, chosen_monitor = self.port == 0, self.monitor_port == 0
        if not chosen_port and port_in_use(self.host, self.port):
            raise ServerStartError(
                f"NATS port {self.host}:{self.port} is already in use "
                "(another nats-server or `noetl-edge up`?); choose another with --nats-port"
            )
        for attempt in range(1, BIND_ATTEMPTS + 1):
            if chosen_port:
                self.port = free_port(self.host)
            if chosen_monitor:
                self.monitor_port = free_port(self.host)
            try:
                self._launch(binary, timeout)
                return
            except _PortTaken as e:
                ours = (chosen_port and e.port == self.port) or (chosen_monitor and e.port == self.monitor_port)
                if not ours or attempt == BIND_ATTEMPTS:
                    raise ServerStartError(f"nats-server exited with code {e.code} during start-up: {e.tail}") from None
                log.warning("nats.port_taken", attempt=attempt, port=e.port)

    def _launch(self, binary: Path, timeout: float) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config(), encoding="utf-8")
        logfile = open(self.log_path, "ab")
        log_start = logfile.tell()
        try:
            self.process = subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if self.die_with_parent and sys.platform.startswith("linux") else None,
                # Its own session: a terminal's Ctrl-C reaches only us, and we stop the server last,
                # after the kernel and the edge have let go of it.
                start_new_session=True,
            )
        finally:
            logfile.close()
        log.info("nats.starting", pid=self.process.pid, url=self.url, config=str(self.config_path))
        self._wait_healthy(timeout, log_start)
        log.info("nats.ready", url=self.url, monitor=f"http://{self.host}:{self.monitor_port}")

    def render_config(self) -> str:
        """The config ``start`` writes (a subclass adds a cluster block)."""
        return render_server_config(
            topology=self.topology,
            server_name=self.server_name,
            host=self.host,
            port=self.port,
            monitor_port=self.monitor_port,
            store_dir=self.data_dir / "jetstream",
            max_payload=self.max_payload,
            sync_interval=self.sync_interval,
        )

    def _wait_healthy(self, timeout: float, log_start: int = 0) -> None:
        assert self.process is not None
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                taken = _TAKEN.search(self._log_since(log_start))
                if taken is not None:
                    raise _PortTaken(int(taken.group(1)), self.process.returncode, self._log_tail())
                raise ServerStartError(
                    f"nats-server exited with code {self.process.returncode} during start-up: {self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerStartError(f"nats-server not healthy after {timeout:.0f}s: {self._log_tail()}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return " | ".join(line.strip() for line in tail) or "(empty server log)"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (crash tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, *, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats.kill", pid=proc.pid, reason=f"no exit {timeout}s after SIGTERM")
                proc.kill()
                proc.wait()
        log.info("nats.stopped", pid=proc.pid, code=proc.returncode)
        return proc.returncode

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def default_data_dir() -> Path:
    """``NOETL_DATA_DIR``, else ``$XDG_DATA_HOME/noetl-edge`` (``~/.local/share/noetl-edge``)."""
    explicit = os.environ.get("NOETL_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "noetl-edge"
