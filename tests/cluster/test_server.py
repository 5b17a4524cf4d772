from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel.errors import ServerBinaryNotFound, ServerStartError
from natscluster.natsbin import find_nats_server
from natscluster.server import EmbeddedServer
from locator import default_topology


def test_finds_wheel_binary() -> None:
    path = find_nats_server({})
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("nats-server: v")


def test_env_override_must_be_executable(tmp_path: Path) -> None:
    with pytest.raises(ServerBinaryNotFound, match="NATS_SERVER_BIN"):
        find_nats_server({"NATS_SERVER_BIN": str(tmp_path / "missing")})


def test_start_writes_config_and_stops_cleanly(nats_server: EmbeddedServer) -> None:
    conf = nats_server.config_path.read_text()
    assert "partition(4,1,2)" in conf and "partition(4,1,2,3)" in conf
    assert str(nats_server.data_dir / "jetstream") in conf
    assert nats_server.running()
    assert nats_server.stop() == 0
    assert not nats_server.running()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = EmbeddedServer(data_dir=tmp_path, topology=default_topology(), port=port)
        with pytest.raises(ServerStartError, match=f"127.0.0.1:{port} is already in use"):
            server.start()
    assert server.process is None


@pytest.mark.parametrize("which", ["port", "monitor_port"])
def test_a_chosen_port_taken_before_the_server_binds_it_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    # The race of the bind-to-0 trick, made certain: the first port chosen for `which` is held by another socket.
    import natscluster.server as server_module

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        real = server_module.free_port
        handed: list[int] = []

        def free_port(host: str = "127.0.0.1") -> int:
            port = taken if len(handed) == (0 if which == "port" else 1) else real(host)
            handed.append(port)
            return port

        monkeypatch.setattr(server_module, "free_port", free_port)
        with EmbeddedServer(data_dir=tmp_path, topology=default_topology(), port=0) as server:
            assert taken in handed
            assert getattr(server, which) != taken
            assert server.running()
            log = server.log_path.read_text()
            assert f"{taken}: bind: address already in use" in log  # the first start really failed on it


def test_a_named_port_taken_at_bind_time_is_an_error_not_a_retry(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        server = EmbeddedServer(data_dir=tmp_path, topology=default_topology(), port=0, monitor_port=taken)
        with pytest.raises(ServerStartError, match=f"exited with code 1 during start-up.*{taken}: bind: address already in use"):
            server.start()
    assert server.monitor_port == taken
    assert server.log_path.read_text().count("address already in use") == 1


def test_bad_binary_reports_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = EmbeddedServer(data_dir=tmp_path, topology=default_topology(), port=0, binary=fake)
    with pytest.raises(ServerStartError, match="exited with code 3.*boom: cannot start"):
        server.start()


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from kernel.logs import configure_logging\n"
        "from natscluster.server import EmbeddedServer\n"
        "configure_logging(level='error')\n"
        "from locator import default_topology\n"
        f"s = EmbeddedServer(data_dir={str(tmp_path)!r}, topology=default_topology(), port=0)\n"
        "s.start()\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # alive
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # A zombie still answers kill(0); it is reaped by init, so check its state too.
        stat = Path(f"/proc/{child}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("nats-server outlived the process that started it")
