"""The README's two commands are the contract with a new user: check both as written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from natscluster.server import free_port

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    run = re.search(r"1\. Run it\*\*\s*```sh\n(.+?)\n```", text, re.S)
    test = re.search(r"2\. Test it\*\*\s*```sh\n(.+?)\n```", text, re.S)
    assert run and test, "README must start with the two commands under '1. Run it' and '2. Test it'"
    return run.group(1).strip(), test.group(1).strip()


def test_commands_are_first_and_ci_runs_the_test_command() -> None:
    run, test = readme_commands()
    text = (REPO / "README.md").read_text()
    assert text.index(run) < text.index(test) < text.index("## ")
    for command in (run, test):
        assert command.startswith("python3 -m venv .venv && "), "each command makes its own virtual environment"
    assert run.endswith("noetl-edge up")
    ci = (REPO / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must call the README's test command verbatim"
    assert ci.rstrip().splitlines()[-1] == test, ".ci/run ends with the README's test command"


def test_ci_installs_nothing_on_the_readmes_behalf() -> None:
    """What the README's command 2 does not install, CI must not install either: a green CI would hide it."""
    ci = (REPO / ".ci" / "run").read_text()
    installs = [line for line in ci.splitlines()
                if re.search(r"^[^#]*\b(apt-get|apt|dnf|yum|brew|snap|apk)\s", line)]
    assert installs == [], f".ci/run installs system packages itself: {installs}"
    assert "pip install" not in ci.replace(readme_commands()[1], ""), ".ci/run installs Python packages beyond command 2"


def fresh_copy(dest: Path) -> Path:
    """The files a clone would have: tracked plus untracked-but-not-ignored, as in the working tree."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


@pytest.mark.slow
def test_run_command_on_a_fresh_copy(tmp_path: Path) -> None:
    run, _ = readme_commands()
    project = fresh_copy(tmp_path / "project")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "VIRTUAL_ENV", "PYTHON"))}
    # A new user's shell: no virtualenv on PATH; the env twins keep the test off the user's port and home.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    http = free_port()
    env |= {"NOETL_DATA_DIR": str(tmp_path / "data"), "NOETL_NATS_PORT": str(port), "NOETL_HTTP_PORT": str(http)}
    proc = subprocess.Popen(
        ["bash", "-c", run], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 600
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("ready ") or line == "":
                break
        assert line.strip() == f"ready nats://127.0.0.1:{port} http://127.0.0.1:{http}", proc.stderr.read() if proc.stderr else ""
        assert (project / ".venv" / "bin" / "noetl-edge").exists()
        token = (tmp_path / "data" / "token").read_text().strip()
        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{http}/readyz", headers={"Authorization": f"Bearer {token}"}), timeout=30
        ) as resp:
            assert resp.status == 200
        # The console's files are package data: the non-editable install serves them.
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/ui/timeline.js", timeout=30) as resp:
            assert resp.status == 200 and b"export class Timeline" in resp.read()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def hidden_docker_compose_path(env: dict[str, str], bin_dir: Path) -> str:
    """PATH without any directory holding a ``docker-compose``, behind a stand-in that fails as a missing one would."""
    bin_dir.mkdir()
    shadow = bin_dir / "docker-compose"
    shadow.write_text("#!/bin/sh\necho 'docker-compose: hidden by tests/test_readme.py' >&2\nexit 127\n")
    shadow.chmod(0o755)
    kept = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and not p.startswith(sys.prefix) and not (Path(p) / "docker-compose").exists()]
    return os.pathsep.join([str(bin_dir), *kept])


@pytest.mark.slow
def test_test_command_in_a_fresh_clone_without_docker_compose(tmp_path: Path) -> None:
    """Command 2 as the README writes it, in a clone of the committed HEAD, with no docker-compose on PATH.

    Running the whole suite inside the suite would recurse and take minutes, so pytest is narrowed to
    tests/deploy (the tests that once needed docker-compose) through PYTEST_ADDOPTS; the venv and the
    ``pip install -e '.[dev]'`` are the README's own, from pip's cache.
    """
    _, test = readme_commands()
    assert test == ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && bash tests/browser/install-chromium"
                    " && .venv/bin/python -m pytest")
    project = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True, capture_output=True, timeout=120)
    assert test in (project / ".ci" / "run").read_text().splitlines()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NOETL_", "VIRTUAL_ENV", "PYTHON", "PYTEST_", "CI"))}
    env["PATH"] = hidden_docker_compose_path(env, tmp_path / "bin")
    assert shutil.which("docker-compose", path=env["PATH"]) == str(tmp_path / "bin" / "docker-compose")
    env["PYTEST_ADDOPTS"] = "-n 0 -v -p no:cacheprovider tests/deploy"
    proc = subprocess.run(["bash", "-c", test], cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "tests/deploy/test_compose.py::test_the_compose_schema_accepts_the_file PASSED" in out, out[-5000:]
    assert "tests/deploy/test_compose.py::test_the_compose_schema_rejects_a_broken_service PASSED" in out
    summary = proc.stdout.rstrip().splitlines()[-1]  # pytest's closing line (pip's notices go to stderr)
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|error|skipped", summary), summary
