"""``noetl-edge schedule …`` as a user runs it, against a real nats-server: JSON off a terminal, a table on one,
bad input exits 2 with one line and stores nothing, an unknown id exits 1."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from typing import Any

import pytest
from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.playbook import Policy
from system_playbooks.schedules.store import ScheduleStore
from tests.conftest import cli_env, cli_path

PLAYBOOK = "path: sched/noop\nversion: 1\nsteps: [{name: a, tool: {kind: noop}}]"
SCOPE = ["--tenant", "acme", "--project", "web"]


@pytest.fixture
async def registered(js: JetStreamContext) -> JetStreamContext:
    await (await Catalog.open(js)).register("acme", "web", PLAYBOOK, policy=Policy())
    return js


def schedule(cli: Any, server: EmbeddedServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = cli("schedule", *args, "--nats-url", server.url, check=check)
    return proc


async def test_create_list_show_pause_resume_delete(nats_server: EmbeddedServer, registered: JetStreamContext, cli: Any) -> None:
    created = json.loads(schedule(cli, nats_server, "create", "--id", "nightly", "--playbook", "sched/noop", "--cron", "0 2 * * *",
                                  "--timezone", "America/New_York", "--workload", '{"day": "today"}', "--catchup", "last",
                                  *SCOPE).stdout)  # fmt: skip
    assert created["schedule"]["timezone"] == "America/New_York" and created["schedule"]["catchup"] == "last"
    assert created["schedule"]["workload"] == {"day": "today"} and created["next_tick"] is not None
    schedule(cli, nats_server, "create", "--id", "often", "--playbook", "sched/noop", "--every", "15m", "--paused", *SCOPE)

    listed = json.loads(schedule(cli, nats_server, "list", *SCOPE).stdout)["schedules"]
    assert [(v["schedule"]["id"], v["schedule"]["paused"]) for v in listed] == [("nightly", False), ("often", True)]
    assert json.loads(schedule(cli, nats_server, "show", "often", *SCOPE).stdout)["schedule"]["every_s"] == 900
    assert json.loads(schedule(cli, nats_server, "resume", "often", *SCOPE).stdout)["schedule"]["paused"] is False
    assert json.loads(schedule(cli, nats_server, "pause", "nightly", *SCOPE).stdout)["next_tick"] is None
    assert json.loads(schedule(cli, nats_server, "delete", "nightly", *SCOPE).stdout)["deleted"] is True

    store = await ScheduleStore.open(registered)
    assert [(s.id, s.paused) for s in await store.list("acme", "web")] == [("often", False)]
    for action in ("show", "pause", "resume", "delete"):
        proc = schedule(cli, nats_server, action, "nightly", *SCOPE, check=False)
        assert proc.returncode == 1 and proc.stderr.strip() == "noetl-edge: error: no schedule 'nightly' in acme/web"
    again = schedule(cli, nats_server, "create", "--id", "often", "--playbook", "sched/noop", "--every", "1m", *SCOPE, check=False)
    assert again.returncode == 1 and "exists in acme/web" in again.stderr
    assert (await store.get("acme", "web", "often")) is not None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cron", "0 25 * * *"], "invalid schedule (cron): bad cron expression '0 25 * * *': Bad hour"),
        (["--cron", "0 2 * * *", "--timezone", "Europe/Atlantis"], "invalid schedule (timezone): unknown time zone 'Europe/Atlantis'"),
        (["--every", "soon"], "invalid schedule (every)"),
        (["--every", "2s", "--grace", "0"], "--grace must be from 1 to 86400 seconds, got 0"),
        (["--every", "2s", "--workload", "[1]"], "workload"),
        (["--every", "2s", "--workload", "{nope"], "--workload is not valid JSON"),
        (["--every", "2s", "--playbook", "sched/missing"], "no playbook sched/missing in acme/web"),
        (["--every", "2s", "--version", "3"], "no version 3 of playbook sched/noop"),
    ],
)
async def test_bad_input_exits_2_with_one_line_and_stores_nothing(
    nats_server: EmbeddedServer, registered: JetStreamContext, cli: Any, args: list[str], words: str
) -> None:
    playbook = [] if "--playbook" in args else ["--playbook", "sched/noop"]
    proc = schedule(cli, nats_server, "create", "--id", "bad", *playbook, *args, *SCOPE, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noetl-edge: error: ") and words in lines[0], proc.stderr
    assert await (await ScheduleStore.open(registered)).list() == []


def test_a_bad_id_or_name_exits_2(cli: Any) -> None:
    # Refused before connecting: no server is needed.
    for args in (["show", "Bad.Id", *SCOPE], ["list", "--tenant", "Acme", "--project", "web"]):
        proc = cli("schedule", *args, "--nats-url", "nats://127.0.0.1:1", check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "invalid" in proc.stderr, proc.stderr


async def test_a_table_on_a_terminal(nats_server: EmbeddedServer, registered: JetStreamContext, cli: Any) -> None:
    schedule(cli, nats_server, "create", "--id", "hourly", "--playbook", "sched/noop", "--cron", "0 * * * *", *SCOPE)
    primary, secondary = pty.openpty()
    env = {**cli_env(), "COLUMNS": "200"}
    proc = subprocess.run([cli_path(), "schedule", "list", *SCOPE, "--nats-url", nats_server.url], stdout=secondary,
                          stderr=subprocess.PIPE, env=env, timeout=60)  # fmt: skip
    os.close(secondary)
    screen = os.read(primary, 65536).decode(errors="replace")
    os.close(primary)
    assert proc.returncode == 0, proc.stderr
    assert "next tick" in screen and "hourly" in screen and "cron 0 * * * * UTC" in screen and not screen.lstrip().startswith("{")
