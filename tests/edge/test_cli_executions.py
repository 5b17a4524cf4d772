"""``noetl-edge executions list``: bad input exits 2 with one line before connecting; NATS away exits 1; a help text.

What it lists (filters, order, pages) is checked against the API on a real stack in
tests/e2e/test_list_executions.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from natscluster.server import EmbeddedServer, free_port

BASE = ["executions", "list", "--tenant", "acme", "--project", "web"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status", "done"], "--status: status DONE is not one of"),
        (["--playbook", "../x"], "--playbook: playbook '../x' is not a playbook path"),
        (["--since", "yesterday"], "--since: since must be an RFC 3339 time"),
        (["--until", "2026-12-01T00:00:00"], "--until: until must be an RFC 3339 time with a zone"),
        (["--since", "2026-12-02T00:00:00Z", "--until", "2026-12-01T00:00:00Z"], "since must be before until"),
        (["--limit", "0"], "--limit: limit must be an integer from 1 to 500"),
        (["--limit", "many"], "--limit: limit must be an integer"),
        (["--page-token", "nope"], "--page-token: page_token is not a token"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, cli: Any, args: list[str], message: str) -> None:
    # An unused port: a bad filter is refused before anything connects.
    proc = cli(*BASE, *args, "--nats-url", f"nats://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noetl-edge: error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_a_bad_tenant_exits_2(cli: Any, tmp_path: Path) -> None:
    proc = cli("executions", "list", "--tenant", "Acme!", "--project", "web", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "tenant" in proc.stderr.strip().splitlines()[-1]


def test_unreachable_nats_exits_1_with_one_line(cli: Any, tmp_path: Path) -> None:
    port = free_port()
    proc = cli(*BASE, "--nats-url", f"nats://127.0.0.1:{port}", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("noetl-edge:")]
    assert len(errors) == 1 and f"nats://127.0.0.1:{port}" in errors[0]
    assert proc.stdout == ""


async def test_an_empty_project_lists_nothing(nats_server: EmbeddedServer, js: Any, cli: Any, tmp_path: Path) -> None:
    proc = cli(*BASE, "--nats-url", nats_server.url, "--data-dir", str(tmp_path))
    assert proc.stdout.strip() == '{"executions":[],"next_page_token":null}'


def test_help_names_the_filters(cli: Any) -> None:
    out = cli("executions", "list", "--help").stdout
    for flag in ("--status", "--playbook", "--since", "--until", "--limit", "--page-token", "--all", "--json"):
        assert flag in out
