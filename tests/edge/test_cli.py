from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from kernel.runtime import default_holder
from natscluster.server import EmbeddedServer, default_data_dir, free_port
from locator import shard_for

from edge.cli import build_parser, main, options

VECTORS = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "locator.json").read_text())
LOCATE_KEYS = ["tenant", "project", "affinity", "shard_count", "fnv1a32", "shard", "cell", "subject_prefix", "stream"]


@pytest.mark.parametrize(
    "command",
    [
        [], ["up"], ["kernel"], ["edge"], ["worker"], ["publish"], ["locate"], ["playbook"], ["playbook", "register"],
        ["playbook", "list"], ["playbook", "show"], ["run"], ["cancel"], ["result"],
        ["cluster"], ["cluster", "up"], ["cluster", "status"], ["cluster", "down"], ["cluster", "bootstrap"],
        ["cluster", "replicas"], ["replay"], ["events"], ["events", "tail"],
        ["history"], ["history", "stats"], ["history", "archive"],
        ["credential"], *[["credential", c] for c in ("set", "rotate", "show", "list", "delete", "rewrap")],
        ["schedule"], *[["schedule", c] for c in ("create", "list", "show", "pause", "resume", "delete")],
    ],
)
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: noetl-edge" in capsys.readouterr().out


def test_version_prints_the_package_version(cli: Any) -> None:
    proc = cli("--version")
    assert proc.stdout == f"noetl-edge {importlib.metadata.version('noetl-edge')}\n"
    assert proc.stderr == ""


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser with its words, e.g. (("playbook", "register"), parser)."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out += _parsers(child, (*path, name))
    return out


def test_tenant_and_project_have_help_wherever_they_are_options() -> None:
    having = {path: p for path, p in _parsers(build_parser())
              if any(a.option_strings in (["--tenant"], ["--project"]) for a in p._actions)}
    assert {"locate", "publish", "run", "cancel", "result", "replay"} <= {path[0] for path in having}
    for path, p in having.items():
        for action in p._actions:
            if action.option_strings in (["--tenant"], ["--project"]):
                assert action.help, f"noetl-edge {' '.join(path)} {action.option_strings[0]} has no help"
        text = p.format_help()
        for flag in ("--tenant", "--project"):
            line = next(line for line in text.splitlines() if line.strip().startswith(f"{flag} "))
            assert len(line.split(maxsplit=2)) == 3, f"noetl-edge {' '.join(path)} --help: {line!r} says nothing"


@pytest.mark.parametrize("command", [["locate"], ["run"], ["playbook", "list"]])
def test_help_explains_tenant_and_project(command: list[str], cli: Any) -> None:
    out = cli(*command, "--help").stdout
    assert "--tenant TENANT       the tenant, e.g. acme" in out
    assert "--project PROJECT     the tenant's project, e.g. web" in out


def test_every_registered_command_is_covered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {  # type: ignore[arg-type]
        "up", "kernel", "edge", "worker", "publish", "locate", "playbook", "plugin", "run", "cancel", "result", "cluster",
        "replay", "events", "history", "credential", "schedule", "executions",
    }


HEAVY = {"nats", "starlette", "hypercorn", "pyarrow", "projector", "system_playbooks"}


@pytest.mark.parametrize(
    ("code", "forbidden"),
    [
        ("from edge.cli import build_parser; build_parser()", HEAVY),
        ("from edge.cli import main; main(['locate', '--tenant', 'acme', '--project', 'web'])", HEAVY),
        ("import edge.cli.publish", HEAVY - {"nats"}),
    ],
)
def test_a_command_imports_only_what_it_runs(code: str, forbidden: set[str], cli_environ: dict[str, str]) -> None:
    # Start-up time is checked by what gets imported, never by the clock.
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set(sys.argv[1:]))))"
    proc = subprocess.run(
        [sys.executable, "-c", probe, *sorted(forbidden)], capture_output=True, text=True, env=cli_environ, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("env", [{}, {"XDG_DATA_HOME": "/srv/xdg"}, {"NOETL_DATA_DIR": "/srv/noetl"}])
def test_help_defaults_are_the_kernels(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The parsers use light twins of these so that `--help` imports neither structlog nor nats.
    monkeypatch.delenv("NOETL_DATA_DIR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert options.default_data_dir() == default_data_dir()
    assert options.default_holder() == default_holder()


@pytest.mark.parametrize("v", VECTORS)
def test_locate_agrees_with_vectors(v: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["locate", "--tenant", v["tenant"], "--project", v["project"], "--affinity", v["affinity"]]
    assert main([*args, "--shards", str(v["shard_count"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == LOCATE_KEYS
    assert (out["fnv1a32"], out["shard"], out["shard_count"]) == (v["fnv1a32"], v["shard"], v["shard_count"])
    assert out["stream"] == f"WAL_{v['shard']}" and out["cell"] == "local"
    assert out["subject_prefix"] == f"wal.{v['shard']}.{v['tenant']}.{v['project']}"


@pytest.mark.parametrize("tenant", ["A", "a.b", "*", ">", "", "a" * 64])
def test_locate_rejects_bad_names(tenant: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["locate", "--tenant", tenant, "--project", "web"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noetl-edge: error: invalid tenant")


def test_usage_error_exit_code(cli: Any) -> None:
    proc = cli("locate", "--project", "web", check=False)
    assert proc.returncode == 2 and "--tenant" in proc.stderr


async def _wal_total(url: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return sum([(await js.stream_info(f"WAL_{n}")).state.messages for n in range(4)])
    finally:
        await nc.close()


async def test_publish_one_event_from_flags_and_json(nats_server: EmbeddedServer, js: Any, cli: Any) -> None:
    proc = cli(
        "publish", "--nats-url", nats_server.url, "--tenant", "acme", "--project", "web",
        "--execution-id", "42", "--type", "step.exit", "--step", "fetch", "--attempt", "1", "--payload", '{"rows": 3}',
    )
    ack = json.loads(proc.stdout)
    assert ack["stream"] == f"WAL_{shard_for('acme', 'web', '', 4)}" and ack["seq"] == 1 and ack["duplicate"] is False
    assert ack["subject"].endswith(".acme.web.42.step.exit")
    env = {"tenant": "acme", "project": "web", "execution_id": "42", "type": "user.note", "event_id": "fixed-1"}
    first = json.loads(cli("publish", "--nats-url", nats_server.url, "--json", json.dumps(env)).stdout)
    again = json.loads(cli("publish", "--nats-url", nats_server.url, "--json", json.dumps(env)).stdout)
    assert first["seq"] == again["seq"] == 2 and again["duplicate"] is True
    assert await _wal_total(nats_server.url) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "Acme", "--project", "web", "--type", "user.x"], "invalid tenant"),
        (["--tenant", "acme", "--project", "web", "--type", "bogus"], "unknown event type"),
        (["--tenant", "acme", "--project", "web", "--type", "user.x", "--payload", "{"], "--payload is not valid JSON"),
        (["--tenant", "acme", "--project", "web", "--type", "user.x", "--payload", json.dumps({"b": "x" * 70000})], "over the 65536-byte cap"),
        (["--tenant", "acme", "--type", "user.x"], "missing --project"),
        (["--json", '{"tenant": "acme"}'], "missing required field"),
        (["--shards", "8", "--tenant", "acme", "--project", "web", "--type", "user.x"], "bootstrapped for 4 shards"),
    ],
)
async def test_publish_rejects_bad_input_and_changes_nothing(
    nats_server: EmbeddedServer, js: Any, cli: Any, args: list[str], message: str
) -> None:
    proc = cli("publish", "--nats-url", nats_server.url, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stdout == ""
    assert len([line for line in proc.stderr.splitlines() if line.startswith("noetl-edge: error:")]) == 1
    assert await _wal_total(nats_server.url) == 0


def test_publish_without_server_is_a_runtime_error(cli: Any) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    proc = cli("publish", "--nats-url", url, "--tenant", "acme", "--project", "web", "--type", "user.x", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"noetl-edge: error: cannot connect to NATS at {url}")


def _jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


async def test_publish_file_summary_and_rerun(nats_server: EmbeddedServer, js: Any, cli: Any, tmp_path: Path) -> None:
    events = [
        {"tenant": f"t{i % 7}", "project": "web", "execution_id": str(100 + i % 20), "type": "user.row", "event_id": f"row-{i}", "payload": {"i": i}}
        for i in range(500)
    ]
    f = _jsonl(tmp_path / "events.jsonl", events)
    first = cli("publish", "--nats-url", nats_server.url, "--file", str(f), "--batch-size", "128")
    assert json.loads(first.stdout) == {"events": 500, "acked": 500, "duplicate": 0, "rejected": 0}
    second = cli("publish", "--nats-url", nats_server.url, "--file", str(f))
    assert json.loads(second.stdout) == {"events": 500, "acked": 0, "duplicate": 500, "rejected": 0}
    assert await _wal_total(nats_server.url) == 500


async def test_publish_file_with_bad_lines(nats_server: EmbeddedServer, js: Any, cli: Any, tmp_path: Path) -> None:
    good = {"tenant": "acme", "project": "web", "execution_id": "5", "type": "user.ok"}
    f = _jsonl(
        tmp_path / "mixed.jsonl",
        [good, "{not json", good | {"tenant": "Bad"}, good | {"payload": {"b": "x" * 70000}}, good],
    )
    proc = cli("publish", "--nats-url", nats_server.url, "--file", str(f), check=False)
    assert proc.returncode == 2
    assert "line 2: not valid JSON" in proc.stderr and "line 3:" in proc.stderr and "line 4:" in proc.stderr
    assert "3 invalid line(s)" in proc.stderr and "nothing was published" in proc.stderr
    assert await _wal_total(nats_server.url) == 0

    skip = cli("publish", "--nats-url", nats_server.url, "--file", str(f), "--skip-invalid", check=False)
    assert skip.returncode == 2
    assert json.loads(skip.stdout) == {"events": 5, "acked": 2, "duplicate": 0, "rejected": 3}
    assert await _wal_total(nats_server.url) == 2

    missing = cli("publish", "--nats-url", nats_server.url, "--file", str(tmp_path / "nope.jsonl"), check=False)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


class Up:
    """``noetl-edge up`` in a subprocess, read until its ``ready`` line."""

    def __init__(self, cli_command: list[str], env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [*cli_command, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )

    def ready(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        assert time.monotonic() < deadline
        assert line.startswith("ready nats://"), f"got {line!r}; stderr: {self.stop_output()}"
        return line.split()[1]

    def stop_output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        return err

    def server_pid(self, data_dir: Path) -> int:
        for line in (data_dir / "nats" / "server.log").read_text().splitlines():
            if "Starting nats-server" in line:
                pid = int(line.split("]")[0].lstrip("["))
        return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize(
    ("sig", "group"), [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)], ids=["term", "int", "ctrl-c"]
)
async def test_up_bootstraps_prints_ready_and_stops_cleanly(
    tmp_path: Path, cli_command: list[str], cli_environ: dict[str, str], sig: signal.Signals, group: bool
) -> None:
    data = tmp_path / "data"
    up = Up(cli_command, cli_environ, "--data-dir", str(data), "--nats-port", "0", "--shards", "3")
    url = up.ready()
    nc = await nats.connect(url)
    try:
        names = {s.config.name for s in await nc.jetstream().streams_info()}
    finally:
        await nc.close()
    assert {"WAL_0", "WAL_2", "CMD_1", "DLQ_2", "KV_proj_0", "KV_catalog", "KV_leases", "OBJ_plugins"} <= names
    assert "WAL_3" not in names
    pid = up.server_pid(data)
    if group:
        # A terminal's Ctrl-C signals the whole foreground group; the server must still be stopped last.
        os.killpg(up.proc.pid, sig)
    else:
        up.proc.send_signal(sig)
    assert up.proc.wait(timeout=30) == 0, up.stop_output()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "nats-server outlived noetl-edge up"
    up.stop_output()

    # The data dir remembers its shard count: another count would re-route existing executions.
    again = subprocess.run(
        [*cli_command, "up", "--data-dir", str(data), "--nats-port", "0", "--shards", "8"],
        capture_output=True, text=True, env=cli_environ, timeout=60,
    )
    assert again.returncode == 2
    assert "was created with 3 shards" in again.stderr


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _up_on_a_terminal(cli_command: list[str], env: dict[str, str], data: Path) -> list[str]:
    """``up`` with stdout and stderr on one pseudo-terminal, as a person runs it; stopped by SIGINT once it is
    ready. Returns the terminal's lines, colours removed."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*cli_command, "up", "--data-dir", str(data), "--nats-port", "0", "--http-port", "0"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, start_new_session=True,
    )
    os.close(secondary)
    screen = b""
    try:
        while b"ready nats://" not in screen or not screen.endswith(b"\n"):
            ready, _, _ = select.select([primary], [], [], 60)
            assert ready, f"no ready line: {screen.decode(errors='replace')}"
            screen += os.read(primary, 65536)
        # Once ready, a request through the edge: whatever it logs lands after the ready line.
        http = re.search(rb"ready nats://\S+ (http://\S+)", screen)
        assert http
        httpx.get(http.group(1).decode() + "/healthz", timeout=10).raise_for_status()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with contextlib.suppress(OSError):  # EIO: the terminal's other end is closed
            while chunk := os.read(primary, 65536):
                screen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    return [ANSI.sub("", line) for line in screen.decode(errors="replace").splitlines() if line.strip()]


def test_up_on_a_terminal_ends_its_start_up_with_the_ready_line(
    tmp_path: Path, cli_command: list[str], cli_environ: dict[str, str]
) -> None:
    env = {k: v for k, v in cli_environ.items() if k not in ("NOETL_LOG_LEVEL", "NOETL_LOG_FORMAT")}
    lines = _up_on_a_terminal(cli_command, env, tmp_path / "data")
    ready = [i for i, line in enumerate(lines) if line.startswith("ready nats://")]
    assert len(ready) == 1, lines
    # Info logs are off on a terminal: nothing scrolls the ready line away, before, after, or at Ctrl-C.
    assert lines[ready[0]:] == [lines[ready[0]]], lines
    assert not [line for line in lines if re.search(r"\[(info|debug)\s*\]", line)], lines
    assert lines[0].startswith("noetl-edge: admin token for the HTTP API is in "), lines  # printed, not logged

    # NOETL_LOG_LEVEL still turns them on: the same start-up, with its info logs on the terminal.
    loud = _up_on_a_terminal(cli_command, env | {"NOETL_LOG_LEVEL": "info"}, tmp_path / "data")
    assert [line for line in loud if re.search(r"\[info\s*\]\s+bootstrap\.done", line)], loud
    assert any(line.startswith("ready nats://") for line in loud), loud


async def test_up_takes_settings_from_env(tmp_path: Path, cli_command: list[str], cli_environ: dict[str, str]) -> None:
    port = free_port()
    env = cli_environ | {"NOETL_DATA_DIR": str(tmp_path / "d"), "NOETL_NATS_PORT": str(port), "NOETL_SHARDS": "2"}
    up = Up(cli_command, env)
    assert up.ready() == f"nats://127.0.0.1:{port}"
    assert json.loads((tmp_path / "d" / "noetl.json").read_text()) == {"shard_count": 2}
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0
    up.stop_output()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NOETL_SHARDS": "four"}, "NOETL_SHARDS must be an integer"),
        ({"NOETL_NATS_PORT": "x"}, "NOETL_NATS_PORT must be an integer"),
        ({"NOETL_DUPLICATE_WINDOW": "5"}, "at least 120"),
        ({"NOETL_LEASE_TTL": "0"}, "NOETL_LEASE_TTL"),
        ({"NOETL_NATS_SYNC": "sometimes"}, "NOETL_NATS_SYNC"),
        ({"NOETL_WORKER_CONCURRENCY": "0"}, "NOETL_WORKER_CONCURRENCY must be at least 1"),
        ({"NOETL_WORKER_ACK_WAIT": "0"}, "NOETL_WORKER_ACK_WAIT must be between"),
    ],
)
def test_up_rejects_bad_settings(tmp_path: Path, cli_command: list[str], cli_environ: dict[str, str], env: dict[str, str], message: str) -> None:
    port = [] if "NOETL_NATS_PORT" in env else ["--nats-port", "0"]
    proc = subprocess.run(
        [*cli_command, "up", "--data-dir", str(tmp_path), *port],
        capture_output=True, text=True, env=cli_environ | env, timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_up_port_in_use(tmp_path: Path, nats_server: EmbeddedServer, cli_command: list[str], cli_environ: dict[str, str]) -> None:
    proc = subprocess.run(
        [*cli_command, "up", "--data-dir", str(tmp_path), "--nats-port", str(nats_server.port)],
        capture_output=True, text=True, env=cli_environ, timeout=60,
    )
    assert proc.returncode == 1 and "already in use" in proc.stderr


async def test_example_events_publish(nats_server: EmbeddedServer, js: Any, cli: Any) -> None:
    examples = Path(__file__).resolve().parent.parent.parent / "examples" / "events.jsonl"
    proc = cli("publish", "--nats-url", nats_server.url, "--file", str(examples))
    assert json.loads(proc.stdout) == {"events": 8, "acked": 8, "duplicate": 0, "rejected": 0}


def test_up_http_port_in_use(tmp_path: Path, cli_command: list[str], cli_environ: dict[str, str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [*cli_command, "up", "--data-dir", str(tmp_path), "--nats-port", "0", "--http-port", str(port)],
            capture_output=True, text=True, env=cli_environ, timeout=60,
        )
    assert proc.returncode == 1 and f"HTTP port 127.0.0.1:{port} is already in use" in proc.stderr


@pytest.mark.parametrize("plugins", ["bogus", "project,nope", ","])
def test_kernel_refuses_unknown_plugins(plugins: str, cli_command: list[str], cli_environ: dict[str, str]) -> None:
    proc = subprocess.run(
        [*cli_command, "kernel", "--plugins", plugins, "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True, text=True, env=cli_environ, timeout=60,
    )
    assert proc.returncode == 2 and "--plugins takes a comma-separated subset of project, orchestrate, materialize" in proc.stderr
