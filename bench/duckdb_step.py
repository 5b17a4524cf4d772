#!/usr/bin/env python
"""A ``tool: duckdb`` step over a stored result, against a Python tool doing the same aggregate, in one run.

What is measured
----------------
``examples.tools.big:rows`` makes ``--rows`` rows (40,000 ≈ 5 MB of JSON, the
example of results by reference); they are stored once in a file result store
(``projector.results.ResultStore``, as a worker stores a large result). Then
rounds alternate:

* **baseline** — what a ``python`` step does with an earlier step's stored result
  today: read it as JSON rows (``ResultStore.get_json``) and aggregate in
  Python (count, sum of ``value``, count of ``even``);
* **duckdb** — the ``duckdb`` kind's run (``run_tool`` with the command's tool
  as the orchestrator renders it: ``tables`` holding the ``result_ref``): read
  the Arrow file, register it, run the same aggregate in SQL.

Each phase runs ``--runs`` times per round; the figure is runs per second per
phase (median and best over the rounds) and the ratio duckdb / baseline on the
medians. Both answers are checked against the expected aggregate on every run.

One JSON object on stdout, with the load average at the start and the end (the
machine may be shared); progress on stderr.

Usage: ``python bench/duckdb_step.py [--rows N] [--runs R] [--rounds K] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples.tools.big import rows  # noqa: E402
from projector.results import ResultKey, ResultStore  # noqa: E402
from system_playbooks.orchestrate.playbook import Policy  # noqa: E402
from worker.tools.runner import ToolContext, run_tool  # noqa: E402

SQL = "select count(*) as n, sum(value) as value_sum, count(*) filter (where even) as evens from load"


def _baseline(store: ResultStore, ref: str) -> dict[str, Any]:
    data = store.get_json(ref)
    return {"n": len(data), "value_sum": sum(r["value"] for r in data), "evens": sum(1 for r in data if r["even"])}


async def _duckdb(ctx: ToolContext, ref: str) -> dict[str, Any]:
    tool = {"kind": "duckdb", "sql": SQL, "tables": {"load": {"status": "COMPLETED", "result": None, "result_ref": ref}}}
    answer = await run_tool(tool, ctx)
    assert isinstance(answer, list) and len(answer) == 1
    return dict(answer[0])


def _phase(run: Any, runs: int, expected: dict[str, Any]) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        got = run()
        if got != expected:
            raise SystemExit(f"wrong answer {got}, expected {expected}")
    return runs / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000, help="rows of the stored result (default 40000, about 5 MB)")
    parser.add_argument("--runs", type=int, default=10, help="runs of each phase per round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="a small run for the tests (2000 rows, 2 runs, 2 rounds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.runs, args.rounds = 2000, 2, 2
    for name in ("rows", "runs", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    load_start = os.getloadavg()
    data = rows(args.rows)
    n = args.rows
    expected = {"n": n, "value_sum": n * (n - 1) / 4, "evens": (n + 1) // 2}
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(f"file://{tmp}/objects")
        stored = store.put(ResultKey("bench", "duckdb", "1", "load", None, 1), data)
        ctx = ToolContext(execution_id="1", step="totals", iteration=None, attempt=1, policy=Policy(), results=store)
        loop = asyncio.new_event_loop()
        try:
            phases: dict[str, list[float]] = {"baseline": [], "duckdb": []}
            runners = {"baseline": lambda: _baseline(store, stored.ref),
                       "duckdb": lambda: loop.run_until_complete(_duckdb(ctx, stored.ref))}  # fmt: skip
            for name, run in runners.items():  # warm-up, not counted
                _phase(run, 1, expected)
            for round_ in range(args.rounds):
                for name, run in runners.items():
                    phases[name].append(_phase(run, args.runs, expected))
                print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in phases.items()),
                      file=sys.stderr)  # fmt: skip
        finally:
            loop.close()
    medians = {name: statistics.median(v) for name, v in phases.items()}
    print(json.dumps({
        "rows": n, "stored_bytes": stored.size, "json_bytes": len(json.dumps(data)), "runs": args.runs,
        "rounds": args.rounds,
        "baseline": {"what": "get_json + Python aggregate", "per_s_median": medians["baseline"],
                     "per_s_best": max(phases["baseline"])},
        "duckdb": {"what": "tool: duckdb over the result_ref", "per_s_median": medians["duckdb"],
                   "per_s_best": max(phases["duckdb"])},
        "ratio_duckdb_over_baseline": medians["duckdb"] / medians["baseline"],
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
