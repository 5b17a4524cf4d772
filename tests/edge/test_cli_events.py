"""``noetl-edge events tail`` as a subprocess against a real nats-server: filters, output, poison, signals."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml

from kernel.bootstrap import bootstrap
from kernel.producer import Producer
from natscluster.server import EmbeddedServer, free_port
from locator.envelope import new_event
from locator.shard import shard_for
from locator.subjects import wal_subject
from locator.topology import Cell, Topology, make_topology

TENANT = "acme"


def projects_on_distinct_shards(tenant: str, count: int, shard_count: int = 4) -> list[str]:
    """Project names of ``tenant`` that land on ``count`` different shards."""
    by_shard: dict[int, str] = {}
    for i in range(200):
        by_shard.setdefault(shard_for(tenant, f"p{i}", "", shard_count), f"p{i}")
        if len(by_shard) == count:
            return list(by_shard.values())
    raise AssertionError("no such projects")


class Tail:
    """``noetl-edge events tail`` in a subprocess, its stdout and stderr collected line by line."""

    def __init__(self, command: list[str], env: dict[str, str], *, stdout: int | None = None) -> None:
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [self._reader(s, lines) for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
                        if s is not None]

    def _reader(self, stream: IO[str], lines: list[str]) -> threading.Thread:
        def read() -> None:
            for line in stream:
                lines.append(line.rstrip("\n"))

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def wait_for(self, what: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.proc.poll() is not None and not what():
                self.finish()
                raise AssertionError(f"tail exited {self.proc.returncode}: {self.err}")
            assert time.monotonic() < deadline, f"not there in time; stdout {self.out}, stderr {self.err}"
            time.sleep(0.02)

    def ready(self) -> str:
        self.wait_for(lambda: any(line.startswith("tailing ") for line in self.err))
        return next(line for line in self.err if line.startswith("tailing "))

    def finish(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.close()
        return code

    def close(self) -> None:
        for r in self.readers:
            r.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def tail(nats_server: EmbeddedServer, cli_command: list[str], cli_environ: dict[str, str]) -> Any:
    started: list[Tail] = []

    def start(*args: str, topology_file: Path | None = None, stdout: int | None = None) -> Tail:
        where = ["--topology", str(topology_file)] if topology_file else ["--nats-url", nats_server.url, "--shards", "4"]
        t = Tail([*cli_command, "events", "tail", *where, *args], cli_environ, stdout=stdout)
        started.append(t)
        return t

    yield start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
        t.close()


async def publish(js: Any, topology: Topology, project: str, type: str, *, tenant: str = TENANT, execution_id: str = "7",
                  **kw: Any) -> int:
    env = new_event(tenant=tenant, project=project, execution_id=execution_id, type=type, **kw)
    return (await Producer(js, topology).publish(env)).seq


def fields(line: str) -> list[str]:
    """shard, seq, time, tenant/project, execution, type, step, attempt, summary."""
    return line.split(maxsplit=8)


async def test_tenant_filter_shows_every_shard_of_the_tenant_and_nothing_else(js: Any, topology: Topology, tail: Any) -> None:
    p1, p2 = projects_on_distinct_shards(TENANT, 2)
    t = tail("--tenant", TENANT, "--count", "3")
    assert t.ready() == f"tailing 4 shards (wal.*.{TENANT}.>) — Ctrl-C to stop"
    await publish(js, topology, "web", "user.note", tenant="globex", payload={"who": "globex"})
    await publish(js, topology, p1, "step.enter", step="fetch", payload={"from": None})
    await publish(js, topology, p2, "step.exit", step="fetch", attempt=2, payload={"result": {"n": 3}})
    await publish(js, topology, p1, "execution.completed")
    assert t.finish() == 0, t.err
    rows = [fields(line) for line in t.out]
    # Arrival order is per shard: across shards only the set is fixed.
    assert sorted(r[3] for r in rows) == sorted([f"{TENANT}/{p1}", f"{TENANT}/{p2}", f"{TENANT}/{p1}"])
    by_type = {r[5]: r for r in rows}
    assert set(by_type) == {"step.enter", "step.exit", "execution.completed"}
    exit_row = by_type["step.exit"]
    assert exit_row[0] == str(shard_for(TENANT, p2, "", 4)) and exit_row[4] == "7"
    assert exit_row[6:] == ["fetch", "#2", 'result {"n":3}']
    assert by_type["step.enter"][6:] == ["fetch", "-", "entered (start)"]
    assert by_type["execution.completed"][6:] == ["-", "-", "completed"]
    assert {r[0] for r in rows} == {str(shard_for(TENANT, p, "", 4)) for p in (p1, p2)}
    assert not [line for line in t.err if "error" in line]


async def test_project_filter_jsonl(js: Any, topology: Topology, tail: Any) -> None:
    p1, p2 = projects_on_distinct_shards(TENANT, 2)
    t = tail("--tenant", TENANT, "--project", p1, "--jsonl", "--count", "2")
    assert f"(wal.*.{TENANT}.{p1}.>)" in t.ready()
    await publish(js, topology, p2, "user.note", payload={"n": 0})
    seqs = [await publish(js, topology, p1, "user.note", payload={"n": n}, execution_id="9") for n in (1, 2)]
    assert t.finish() == 0, t.err
    docs = [json.loads(line) for line in t.out]
    assert [(d["shard"], d["seq"], d["event"]["payload"]) for d in docs] == [
        (shard_for(TENANT, p1, "", 4), seq, {"n": n}) for seq, n in zip(seqs, (1, 2), strict=True)
    ]
    assert {(d["event"]["tenant"], d["event"]["project"], d["event"]["execution_id"]) for d in docs} == {(TENANT, p1, "9")}


@pytest.mark.parametrize(("glob", "shown"), [("step.*", "wal.*.acme.*.*.step.>"), ("step.e*", "wal.*.acme.>, type step.e*")])
async def test_type_glob(js: Any, topology: Topology, tail: Any, glob: str, shown: str) -> None:
    t = tail("--tenant", TENANT, "--type", glob, "--count", "2")
    assert f"({shown})" in t.ready()
    for kind, step in (("user.note", None), ("step.enter", "a"), ("execution.started", None), ("step.exit", "a")):
        await publish(js, topology, "web", kind, step=step)
    assert t.finish() == 0, t.err
    assert [fields(line)[5] for line in t.out] == ["step.enter", "step.exit"]


async def test_one_shard_since_seq(js: Any, topology: Topology, tail: Any) -> None:
    shard = shard_for(TENANT, "web", "", 4)
    seqs = [await publish(js, topology, "web", "user.note", payload={"n": n}) for n in range(3)]
    other = next(p for p in projects_on_distinct_shards(TENANT, 4) if shard_for(TENANT, p, "", 4) != shard)
    await publish(js, topology, other, "user.note")
    t = tail("--shard", str(shard), "--since-seq", str(seqs[1]), "--count", "2", "--jsonl")
    assert t.ready() == f"tailing shard {shard} (wal.{shard}.>) from seq {seqs[1]} — Ctrl-C to stop"
    assert t.finish() == 0, t.err
    assert [(d["shard"], d["seq"], d["event"]["payload"]["n"]) for d in map(json.loads, t.out)] == [
        (shard, seqs[1], 1), (shard, seqs[2], 2)
    ]


@pytest.mark.parametrize("jsonl", [False, True], ids=["lines", "jsonl"])
async def test_credentials_are_scrubbed(js: Any, topology: Topology, tail: Any, jsonl: bool) -> None:
    t = tail("--tenant", TENANT, "--count", "2", *(["--jsonl"] if jsonl else []))
    t.ready()
    await publish(js, topology, "web", "user.login", payload={"user": "ada", "password": "hunter2",
                                                              "log": "postgres://ada:hunter2@db/app"})
    await publish(js, topology, "web", "step.exit", step="s", attempt=1, payload={"result": {"api_key": "hunter2"}})
    assert t.finish() == 0, t.err
    text = "\n".join(t.out)
    assert len(t.out) == 2 and "hunter2" not in text and "***" in text, text
    assert "ada" in text  # scrubbed, not dropped


async def test_poison_is_named_on_stderr_and_the_tail_goes_on(js: Any, topology: Topology, tail: Any) -> None:
    shard = shard_for(TENANT, "web", "", 4)
    t = tail("--tenant", TENANT, "--count", "1")
    t.ready()
    poison = (await js.publish(wal_subject(shard, TENANT, "web", "7", "user.note"), b"not json")).seq
    seq = await publish(js, topology, "web", "user.note", payload={"after": "poison"})
    assert t.finish() == 0, t.err
    assert [fields(line)[:2] for line in t.out] == [[str(shard), str(seq)]]
    named = [line for line in t.err if line.startswith("noetl-edge: poison")]
    assert len(named) == 1 and named[0].startswith(f"noetl-edge: poison on shard {shard} seq {poison}: not_json: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--project", "web"], "--project needs --tenant"),
        (["--since-seq", "3"], "--since-seq needs --shard"),
        (["--shard", "4"], "--shard 4 is out of range"),
        (["--shard", "-1"], "--shard -1 is out of range"),
        (["--shard", "1", "--since-seq", "0"], "--since-seq must be >= 1"),
        (["--tenant", "Acme.Corp"], "invalid tenant 'Acme.Corp'"),
        (["--tenant", "acme", "--project", "a b"], "invalid project 'a b'"),
        (["--count", "0"], "--count must be >= 1"),
        (["--type", "step exit"], "is not a type glob"),
    ],
)
def test_usage_errors(cli_command: list[str], cli_environ: dict[str, str], args: list[str], message: str) -> None:
    # Port 1: nothing listens there, so an exit 2 proves the flags were refused before connecting.
    proc = subprocess.run([*cli_command, "events", "tail", "--nats-url", "nats://127.0.0.1:1", *args],
                          check=False, capture_output=True, text=True, env=cli_environ, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("noetl-edge: error: ") and message in proc.stderr


def test_no_server_is_one_error_line(cli_command: list[str], cli_environ: dict[str, str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    proc = subprocess.run([*cli_command, "events", "tail", "--nats-url", url], check=False, capture_output=True,
                          text=True, env=cli_environ, timeout=60)
    assert (proc.returncode, proc.stdout) == (1, "")
    # Besides the connection's own warning log (a JSON line), one error line.
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith(f"noetl-edge: error: cannot connect to NATS at {url}"), proc.stderr


def test_not_bootstrapped_says_how_to(nats_server: EmbeddedServer, cli_command: list[str], cli_environ: dict[str, str]) -> None:
    proc = subprocess.run([*cli_command, "events", "tail", "--nats-url", nats_server.url, "--shards", "4"],
                          check=False, capture_output=True, text=True, env=cli_environ, timeout=60)
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "noetl-edge: error: stream WAL_0 does not exist: bootstrap the topology first "
        "(`noetl-edge up` does it, or `noetl-edge cluster bootstrap`)")


async def test_other_shard_count_is_refused(js: Any, tail: Any) -> None:
    t = tail("--shards", "2")  # the last --shards wins: the server was bootstrapped with 4
    assert t.finish() == 2 and t.out == []
    assert "bootstrapped for 4 shards, this client uses 2" in t.err[-1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
async def test_a_signal_stops_it_cleanly(js: Any, topology: Topology, tail: Any, sig: signal.Signals) -> None:
    t = tail("--tenant", TENANT)
    t.ready()
    await publish(js, topology, "web", "user.note")
    t.wait_for(lambda: len(t.out) == 1)
    t.proc.send_signal(sig)
    assert t.finish() == 0, t.err
    assert not [line for line in t.err if "Traceback" in line or "error" in line.lower()], t.err


async def test_colour_on_a_terminal_only(js: Any, topology: Topology, tail: Any) -> None:
    primary, secondary = pty.openpty()
    t = tail("--tenant", TENANT, "--count", "1", stdout=secondary)
    os.close(secondary)
    t.ready()
    await publish(js, topology, "web", "call.error", step="s", attempt=1, payload={"error": {"message": "boom"}})
    assert t.finish() == 0, t.err
    out = b""
    try:
        while chunk := os.read(primary, 4096):
            out += chunk
    except OSError:  # EIO: the terminal's other end is closed
        pass
    os.close(primary)
    text = out.decode()
    assert "\x1b[" in text and "call.error" in text and "error boom" in text


async def test_two_cells(nc: Any, nats_server: EmbeddedServer, tail: Any, tmp_path: Path) -> None:
    """A topology file of two cells (here two spellings of one server's URL): a connection per cell, every shard tailed."""
    port = nats_server.url.rsplit(":", 1)[1]
    cells = [Cell(name="east", urls=(f"nats://127.0.0.1:{port}",), shards=(0, 1)),
             Cell(name="west", urls=(f"nats://localhost:{port}",), shards=(2, 3))]
    two = make_topology(shard_count=4, replicas=1, cells=cells)
    await bootstrap(nc.jetstream(), two)
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({"shard_count": 4, "replicas": 1, "cells": [
        {"name": c.name, "urls": list(c.urls), "shards": list(c.shards)} for c in cells]}))
    east, west = (next(p for p in projects_on_distinct_shards(TENANT, 4) if shard_for(TENANT, p, "", 4) in c.shards)
                  for c in cells)
    t = tail("--tenant", TENANT, "--count", "2", topology_file=path)
    assert t.ready().startswith("tailing 4 shards")
    async with httpx.AsyncClient() as http:
        connz = (await http.get(f"http://127.0.0.1:{nats_server.monitor_port}/connz?limit=1000")).json()
    tails = [c for c in connz["connections"] if c.get("name") == "noetl-events-tail"]
    assert len(tails) == 2
    for project in (east, west):
        await publish(nc.jetstream(), two, project, "user.note")
    assert t.finish() == 0, t.err
    assert sorted(fields(line)[3] for line in t.out) == sorted(f"{TENANT}/{p}" for p in (east, west))


async def test_a_closed_pipe_ends_it_quietly(nats_server: EmbeddedServer, js: Any, topology: Topology,
                                             cli_command: list[str], cli_environ: dict[str, str]) -> None:
    """``events tail | head -n 1``: once the reader is gone the next write ends the tail, exit 0, no traceback."""
    tail_cmd = " ".join([*cli_command, "events", "tail", "--nats-url", nats_server.url, "--shards", "4", "--tenant", TENANT])
    t = Tail(["bash", "-c", f"set -o pipefail; {tail_cmd} | head -n 1"], cli_environ)
    try:
        t.ready()
        n = 0
        while t.proc.poll() is None:  # head may still hold the pipe open for the first few: keep publishing
            await publish(js, topology, "web", "user.note", payload={"n": n})
            n += 1
            assert n < 10_000, t.err
            await asyncio.sleep(0.01)
        assert t.finish() == 0, t.err
        assert len(t.out) == 1 and fields(t.out[0])[5] == "user.note"
        assert not [line for line in t.err if "Traceback" in line or "Error" in line], t.err
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
        t.close()


async def test_since_seq_reads_what_retention_archived_in_seq_order(
    js: Any, topology: Topology, tail: Any, tmp_path: Path
) -> None:
    from projector.archive import Archiver, HistoryArchive

    shard = shard_for(TENANT, "web", "", 4)
    seqs = []
    for n in range(6):  # two executions interleaved; 8 ends and is archived, 9 keeps going
        execution = "8" if n % 2 == 0 else "9"
        seqs.append(await publish(js, topology, "web", "user.note", execution_id=execution, payload={"n": n}))
    seqs.append(await publish(js, topology, "web", "execution.completed", execution_id="8"))
    archive = HistoryArchive.at(f"file://{tmp_path}/objects")
    report = await Archiver(js, shard=shard, shard_count=4, archive=archive).archive_executions([(TENANT, "web", "8")])
    assert report.executions == 1 and report.messages == 4
    seqs.append(await publish(js, topology, "web", "user.note", execution_id="9", payload={"n": 6}))
    t = tail("--shard", str(shard), "--since-seq", str(seqs[1]), "--count", str(len(seqs) - 1), "--jsonl",
             "--data-dir", str(tmp_path))
    assert t.finish() == 0, t.err
    got = [(d["seq"], d["event"]["execution_id"], d["event"]["type"]) for d in map(json.loads, t.out)]
    # Every event from seqs[1] on, once, in seq order, whichever tier holds it.
    assert [seq for seq, _, _ in got] == seqs[1:]
    assert [x for _, x, _ in got] == ["9", "8", "9", "8", "9", "8", "9"]
    # The type filter applies to archived events too.
    t = tail("--shard", str(shard), "--since-seq", "1", "--type", "execution.*", "--count", "1", "--jsonl",
             "--data-dir", str(tmp_path))
    assert t.finish() == 0, t.err
    assert [json.loads(line)["seq"] for line in t.out] == [seqs[6]]
