"""Every command's arguments, defined without importing any command.

Each command names the module that runs it (``run="edge.cli.up"``); ``main`` imports
that module only once the arguments parse, so ``--help`` and usage errors never pay
for NATS, Starlette or Arrow.

>>> build_parser().parse_args(["locate", "--tenant", "acme", "--project", "web"]).run
'edge.cli.locate'
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path
from typing import TypeAlias

from edge.cli.options import add_log_options, add_topology_options, default_data_dir, default_holder
from locator.envelope import DEFAULT_PAYLOAD_CAP

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

TENANT_HELP = "the tenant, e.g. acme (lowercase letters, digits, '_' or '-')"
PROJECT_HELP = "the tenant's project, e.g. web; tenant, project and affinity pick the shard"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noetl-edge",
        description="noetl-edge: a pure event-sourced edge runtime on NATS JetStream. "
        "Exit codes: 0 ok, 1 runtime failure, 2 usage or validation error, 3 `replay --check` found a divergence.",
    )
    parser.add_argument("--version", action="version", version=f"noetl-edge {importlib.metadata.version('noetl-edge')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_up, _kernel, _edge, _worker, _publish, _locate, _playbook, _plugin, _run, _cancel, _result, _replay, _events, _cluster, _history, _credential, _schedule, _executions):
        add(sub)
    for p in sub.choices.values():
        add_log_options(p)
    return parser


def _up(sub: Subparsers) -> None:
    p = sub.add_parser(
        "up",
        help="run the embedded default (nats-server, bootstrap, kernel, data workers, HTTP edge) in the foreground",
        description="Start an embedded nats-server with JetStream on --data-dir, bootstrap every shard's "
        "streams and buckets, run a kernel that folds every shard into projections and Feather snapshots "
        "(file://<data-dir>/objects unless NOETL_OBJECTS_URL) and orchestrates playbooks, a pool of data "
        "workers (NOETL_WORKER_CONCURRENCY, default 4; python tools under NOETL_PYTHON_ALLOW, http tools to "
        "NOETL_HTTP_HOSTS, nats tools to NOETL_NATS_SUBJECTS; the tool kinds of NOETL_TOOL_KINDS, default the "
        "built-in ones), serve the HTTP edge on --http-port (creating an "
        "admin token at <data-dir>/token unless NOETL_TOKENS_FILE is set), print 'ready <nats-url> <http-url>' "
        "and run until SIGINT/SIGTERM.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where the WAL and objects live (env NOETL_DATA_DIR; default {default_data_dir()})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--nats-port", type=int, default=None, help="NATS client port, 0 = any free port (env NOETL_NATS_PORT; default 4222)"
    )
    p.add_argument(
        "--http-port", type=int, default=None, help="the edge's HTTP port (env NOETL_HTTP_PORT; default 8080, 0 = any free port)"
    )
    p.add_argument("--shards", type=int, default=None, help="shard count (env NOETL_SHARDS; default 4)")
    p.add_argument(
        "--kernels", type=int, default=None, metavar="N",
        help="kernel processes sharing the shards through their leases, 1 to the shard count: this one and N-1 "
        "children, so that folding uses more than one core (env NOETL_UP_KERNELS; default 1)",
    )
    p.set_defaults(run="edge.cli.up")


def _kernel(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kernel",
        help="run a kernel (fold, orchestrate and materialize the shards it leases) against a NATS server",
        description="Connect to NATS, take leases on a fair share of the cell's shards, fold them "
        "(system/project), drive executions that name a playbook (system/orchestrate, with its durable "
        "timers on cmd.<shard>.timer) and write Feather snapshots (system/materialize) until SIGINT/SIGTERM. "
        "Run several: they share the shards and take over each other's within the lease TTL.",
    )
    p.add_argument("--cell", default=None, help="the cell whose shards to fold (default: the topology's first)")
    p.add_argument(
        "--plugins", default=None, metavar="LIST",
        help="comma-separated system plug-ins to run: project, orchestrate, materialize, cleanup (default all). A kernel "
        "running some of them leases shards in a group of its own, so e.g. `--plugins orchestrate` and "
        "`--plugins project,materialize` in two processes each hold every shard",
    )
    p.add_argument("--holder", default=None, help=f"lease holder id (default host-pid, e.g. {default_holder()})")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"base of the default file:// object store (env NOETL_DATA_DIR; default {default_data_dir()}); "
        "NOETL_OBJECTS_URL overrides the object store, e.g. s3://bucket/prefix",
    )
    add_topology_options(p)
    p.set_defaults(run="edge.cli.kernel")


def _edge(sub: Subparsers) -> None:
    p = sub.add_parser(
        "edge",
        help="serve the HTTP API (projections on demand, events, SSE, metrics) with Hypercorn",
        description="Serve the edge API on --bind until SIGINT/SIGTERM. Tokens come from NOETL_TOKENS_FILE, "
        "else <data-dir>/token (created by `noetl-edge up`); with neither, it refuses to start.",
    )
    p.add_argument("--bind", action="append", default=None, metavar="HOST:PORT", help="address to serve on (repeatable; default 127.0.0.1:8080)")
    p.add_argument("--data-dir", type=Path, default=None, help=f"where <data-dir>/token and the default object store are (default {default_data_dir()})")
    add_topology_options(p)
    p.set_defaults(run="edge.cli.edge")


def _publish(sub: Subparsers) -> None:
    p = sub.add_parser(
        "publish",
        help="publish one event (flags or --json) or many (--file events.jsonl) to the WAL",
        description="Publish v1 envelopes straight to their shard's WAL subject with Nats-Msg-Id = event_id. "
        "A missing event_id or ts is filled in; give event_id yourself to make re-runs idempotent. "
        "With --file, every line is validated first: an invalid line stops the run before anything "
        "is published, unless --skip-invalid. Prints acks (one event) or a summary (file) as JSON.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--json", metavar="ENVELOPE", help="the whole envelope as a JSON object")
    src.add_argument("--file", metavar="FILE", help="JSON-lines file of envelopes ('-' for stdin)")
    ev = p.add_argument_group("one event from flags")
    ev.add_argument("--tenant", help=TENANT_HELP)
    ev.add_argument("--project", help=PROJECT_HELP)
    ev.add_argument("--affinity", default="", help="the affinity key of the execution (default none)")
    ev.add_argument("--execution-id", help="decimal id (default: a new snowflake id)")
    ev.add_argument("--type", help="event type, e.g. user.note or step.exit")
    ev.add_argument("--step")
    ev.add_argument("--attempt", type=int)
    ev.add_argument("--payload", default="{}", help="payload JSON object (default {})")
    ev.add_argument("--result-ref")
    ev.add_argument("--causation-id")
    ev.add_argument("--event-id", help="default: a new random id")
    p.add_argument("--payload-cap", type=int, default=DEFAULT_PAYLOAD_CAP, help="payload cap in bytes (default 65536)")
    p.add_argument("--batch-size", type=int, default=1000, help="events pipelined per batch with --file (default 1000)")
    p.add_argument("--skip-invalid", action="store_true", help="with --file: publish the valid lines, report the rest")
    add_topology_options(p)
    p.set_defaults(run="edge.cli.publish")


def _locate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "locate",
        help="print the shard, cell, subject prefix and stream of a tenant/project",
        description="Compute where (tenant, project, affinity) lives with the FNV-1a locator. "
        "Prints one JSON object; events of an execution go to <subject_prefix>.<execution_id>.<type>.",
    )
    p.add_argument("--tenant", required=True, help=TENANT_HELP)
    p.add_argument("--project", required=True, help=PROJECT_HELP)
    p.add_argument("--affinity", default="", help="optional affinity key (default empty)")
    add_topology_options(p, with_url=False)
    p.set_defaults(run="edge.cli.locate")


def _playbook(sub: Subparsers) -> None:
    p = sub.add_parser(
        "playbook",
        help="register, list and show playbooks in the catalog",
        description="The playbook catalog (KV bucket 'catalog'): versions are immutable, 'latest' is the highest.",
    )
    p.set_defaults(run="edge.cli.playbook")  # which of register/list/show: args.playbook_command
    commands = p.add_subparsers(dest="playbook_command", required=True, metavar="SUBCOMMAND")

    reg = commands.add_parser(
        "register",
        help="validate a playbook file and store its version",
        description="Validate FILE against the operator policy (env NOETL_PYTHON_ALLOW, NOETL_HTTP_HOSTS, "
        "NOETL_NATS_SUBJECTS, NOETL_TOOL_KINDS, comma-separated; or the flags) before connecting: an invalid file exits 2 with the path of "
        "the error and writes nothing. Registering the same content again is a no-op; a version that "
        "exists with other content exits 1.",
    )
    reg.add_argument("file", metavar="FILE", help="the playbook YAML file")
    reg.add_argument("--python-allow", action="append", default=None, metavar="PREFIX",
                     help="module prefix python tools may call (repeatable; default env NOETL_PYTHON_ALLOW)")
    reg.add_argument("--http-host", action="append", default=None, metavar="HOST",
                     help="host http tools may reach (repeatable; default env NOETL_HTTP_HOSTS)")

    ls = commands.add_parser("list", help="every (path, version) of a project",
                             description="Print the project's playbooks as JSON, sorted by path and version.")

    show = commands.add_parser("show", help="one playbook version as JSON",
                               description="Print a playbook as JSON: the latest version, or --version N.")
    show.add_argument("path", metavar="PATH", help="the playbook path, e.g. etl/daily")
    show.add_argument("--version", type=int, default=None, metavar="N", help="the version (default: latest)")

    for q in (reg, ls, show):
        q.add_argument("--tenant", required=True, help=TENANT_HELP)
        q.add_argument("--project", required=True, help=PROJECT_HELP)
        add_topology_options(q)
        add_log_options(q)


def _plugin(sub: Subparsers) -> None:
    p = sub.add_parser(
        "plugin",
        help="build WASM plug-ins and register, list and show them in the plug-in registry",
        description="WASM plug-ins: sources (C or Zig) compiled to wasm32 with the ziglang wheel; modules kept in "
        "the Object Store 'plugins' with their sha256, versions in KV 'catalog'. See docs/plugins.md.",
    )
    p.set_defaults(run="edge.cli.plugin")  # which subcommand: args.plugin_command
    commands = p.add_subparsers(dest="plugin_command", required=True, metavar="SUBCOMMAND")

    bld = commands.add_parser(
        "build", help="compile a .c or .zig source to a wasm32 module",
        description="Compile SRC to wasm32 (freestanding, exports memory/alloc/run; C sources get the guest SDK "
        "system_playbooks/wasm_sdk on the include path). Prints {wasm, size, sha256}; a compile error exits 2 "
        "with the compiler's output on stderr.",
    )  # fmt: skip
    bld.add_argument("src", metavar="SRC", help="the source file (.c or .zig)")
    bld.add_argument("-o", "--output", default=None, metavar="OUT", help="the module to write (default: SRC with .wasm)")
    bld.add_argument("-D", "--define", action="append", default=None, metavar="NAME[=VALUE]",
                     help="a C preprocessor definition (repeatable)")

    reg = commands.add_parser(
        "register", help="upload a module as the plug-in's next version and make it active",
        description="Compile and ABI-check WASM, upload it, and bump the plug-in's version (the next dispatch "
        "uses it, no restart). The same bytes as the active version are a no-op (created=false).",
    )  # fmt: skip
    reg.add_argument("wasm", metavar="WASM", help="the compiled module")
    reg.add_argument("--path", required=True, help="the plug-in path, e.g. tools/score")

    ls = commands.add_parser("list", help="every registered version of the owner's plug-ins",
                             description="Print the owner's plug-in versions as JSON, sorted by path and version.")

    show = commands.add_parser("show", help="one plug-in version as JSON",
                               description="Print a plug-in version's record (the active one, or --version N).")
    show.add_argument("path", metavar="PATH", help="the plug-in path, e.g. tools/score")
    show.add_argument("--version", type=int, default=None, metavar="N", help="the version (default: the active one)")

    for q in (reg, ls, show):
        q.add_argument("--tenant", default=None, help="the owning tenant (with --project)")
        q.add_argument("--project", default=None, help="the owning project (with --tenant)")
        q.add_argument("--system", action="store_true", help="a system plug-in (the project's own)")
        add_topology_options(q)
    for q in (bld, reg, ls, show):
        add_log_options(q)


def _worker(sub: Subparsers) -> None:
    p = sub.add_parser(
        "worker",
        help="a data worker: pull commands, run their tools, report results to the WAL",
        description="Pull commands from every shard's command stream (CMD_<shard>, subjects cmd.<shard>.<pool>), "
        "run each tool with its kind from the tool registry (the kinds of NOETL_TOOL_KINDS, default the built-in "
        "ones: python callables under the operator's NOETL_PYTHON_ALLOW prefixes, http to NOETL_HTTP_HOSTS, nats "
        "to NOETL_NATS_SUBJECTS, noop, wasm, duckdb), publish command.claimed and step.exit / command.completed / call.error, then "
        "ack. Results over the payload cap go to object storage (NOETL_OBJECTS_URL, default "
        "file://<data-dir>/objects). Stateless: run as many as you like; a killed worker's command is "
        "redelivered after NOETL_WORKER_ACK_WAIT seconds (default 30).",
    )
    p.add_argument("--pool", default="shared",
                   help="the worker pool to serve: the commands of steps with `pool: NAME` (default shared, the pool of "
                        "steps that name none; timer is reserved)")
    p.add_argument("--prepare", action="store_true",
                   help="create the pool's durable consumer (workers_<pool>) on every shard and exit without running "
                        "anything: what an autoscaler reading the pool's lag needs before its first worker")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="commands run at once (env NOETL_WORKER_CONCURRENCY; default 4)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"where file:// results go (env NOETL_DATA_DIR; default {default_data_dir()})")
    add_topology_options(p)
    p.set_defaults(run="edge.cli.worker")


def _execution_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", required=True, help=TENANT_HELP)
    p.add_argument("--project", required=True, help=PROJECT_HELP)
    p.add_argument("--affinity", default="", help="the affinity the execution was started with (default none)")
    add_topology_options(p)


def _run(sub: Subparsers) -> None:
    p = sub.add_parser(
        "run",
        help="register a playbook, start an execution, and (--wait) follow it to its end",
        description="Validate PLAYBOOK (exit 2 with the path of the error, nothing written), register it in the "
        "catalog (the same content again is a no-op), publish execution.requested and print "
        "{execution_id, playbook, version, seq, shard} (and replayed with --idempotency-key). With --wait, print a line per finished step and the callback path of a "
        "waiting step, then the final projection as JSON; exit 0 if it COMPLETED, 1 if it FAILED, was "
        "CANCELLED or --timeout passed. Needs a running kernel and workers (`noetl-edge up` runs both).",
    )
    p.add_argument("file", metavar="PLAYBOOK", help="the playbook YAML file")
    p.add_argument("--workload", default=None, metavar="JSON", help="a JSON object merged over the playbook's workload")
    p.add_argument("--wait", action="store_true", help="follow the execution until it ends")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="with --wait, give up after S seconds (default 600)")
    p.add_argument(
        "--idempotency-key", default=None, metavar="KEY",
        help="start at most once per KEY in the tenant's project within NOETL_IDEMPOTENCY_WINDOW (24 h): a repeat "
        "prints the first execution with \"replayed\": true; the same KEY with another playbook version, workload "
        "or affinity exits 2",
    )
    _execution_options(p)
    p.set_defaults(run="edge.cli.run")


def _cancel(sub: Subparsers) -> None:
    p = sub.add_parser(
        "cancel",
        help="cancel an execution: no new commands, steps in flight finish, then CANCELLED",
        description="Publish execution.cancel_requested for EXECUTION_ID (asking twice stores it once).",
    )
    p.add_argument("execution_id", metavar="EXECUTION_ID")
    _execution_options(p)
    p.set_defaults(run="edge.cli.cancel")


def _result(sub: Subparsers) -> None:
    p = sub.add_parser(
        "result",
        help="print a step's result, fetching it from object storage when the event carried a result_ref",
        description="Print {execution_id, step, status, result_ref, result} as JSON; with --out FILE, write a "
        "stored result's Arrow IPC (Feather) file instead (a result carried in the event itself is always "
        "printed as JSON).",
    )
    p.add_argument("execution_id", metavar="EXECUTION_ID")
    p.add_argument("step", metavar="STEP")
    p.add_argument("--out", default=None, metavar="FILE", help="write the stored Feather file here")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"where file:// objects live (env NOETL_DATA_DIR; default {default_data_dir()})")
    _execution_options(p)
    p.set_defaults(run="edge.cli.result")


def _replay(sub: Subparsers) -> None:
    p = sub.add_parser(
        "replay",
        help="read an execution's history straight from its shard's WAL: timeline, state, diff, --check",
        description="Read every event of one execution from its shard's WAL (the KV cache and snapshots are "
        "not used, so it works with both wiped) and print a timeline: seq, time, time since the previous "
        "event, type, step, attempt and a one-line summary (an execution retention archived is read from the "
        "archive first, then the WAL). A bar shows progress on long histories. "
        "--check re-drives system/orchestrate's planner over the history and exits 3 at the first event "
        "where the playbook would decide differently. Exit codes: 0 ok, 1 runtime failure or unknown execution, "
        "2 usage error, 3 --check found a divergence.",
    )
    p.add_argument("target", metavar="URN|EXECUTION_ID",
                   help="noetl://<tenant>/<project>/executions/<id>[?affinity=A], or an id with --tenant and --project")
    p.add_argument("--tenant", default=None, help="with an EXECUTION_ID: its tenant")
    p.add_argument("--project", default=None, help="with an EXECUTION_ID: its project")
    p.add_argument("--affinity", default=None, help="with an EXECUTION_ID: the affinity it was started with (default none)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--until-seq", type=int, default=None, metavar="N", help="stop after WAL sequence N")
    stop.add_argument("--as-of", default=None, metavar="TIME",
                      help="stop before the first event whose ts is after TIME (ISO 8601 with a zone, e.g. 2026-11-22T08:00:00Z)")
    p.add_argument("--step", default=None, metavar="NAME", help="show only the events of step NAME (the state still folds all)")
    p.add_argument("--state", nargs="?", const="end", choices=["end", "each"], default=None,
                   help="the projection at the end (default), or after each event: 'each' (in a table, what changed)")
    p.add_argument("--diff", nargs=2, type=int, default=None, metavar=("A", "B"),
                   help="what changed in the projection from seq A to seq B")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    out.add_argument("--jsonl", action="store_true",
                     help="one JSON object per event, then one line each for --state, --diff and --check if asked")
    p.add_argument("--export", default=None, metavar="FILE.feather",
                   help="also write the history as an Arrow table (seq, ts, dt_ms, type, step, attempt, event_id, payload JSON, "
                   "result_ref)")
    p.add_argument("--follow", action="store_true", help="after the history, keep printing new events until Ctrl-C")
    p.add_argument("--check", action="store_true",
                   help="re-drive the orchestrator's decisions with the playbook version the execution ran; exit 3 on divergence")
    p.add_argument("--against-version", type=int, default=None, metavar="N",
                   help="with --check: use version N of the playbook instead")
    p.add_argument("--limit", type=int, default=1_000_000, metavar="N",
                   help="refuse histories longer than N events (default 1000000)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the history archive is read from once system/cleanup moved an execution out of the WAL: "
                   f"file://<data-dir>/objects unless NOETL_OBJECTS_URL (env NOETL_DATA_DIR; default {default_data_dir()})")
    add_topology_options(p)
    p.set_defaults(run="edge.cli.replay")


def _events(sub: Subparsers) -> None:
    p = sub.add_parser("events", help="live events: `events tail` prints a shard's or a tenant's new events",
                       description="Watch the WAL live.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    tail = actions.add_parser(
        "tail",
        help="print new WAL events as they are stored, filtered by tenant, project, shard and type",
        description="Follow every shard's WAL (or --shard's) from now on (or from --since-seq) and print one "
        "line per event: shard, seq, time, tenant/project, execution, type, step, attempt and a summary; "
        "--jsonl prints each event as JSON. Runs until Ctrl-C.",
    )
    tail.add_argument("--tenant", default=None, help="only this tenant's events")
    tail.add_argument("--project", default=None, help="only this project's events (needs --tenant)")
    tail.add_argument("--type", default=None, metavar="GLOB", help="only event types matching GLOB, e.g. 'step.*' or 'user.*'")
    tail.add_argument("--shard", type=int, default=None, metavar="N", help="only shard N")
    tail.add_argument("--since-seq", type=int, default=None, metavar="SEQ",
                      help="start at WAL sequence SEQ (with --shard) instead of new events only")
    tail.add_argument("--jsonl", action="store_true", help="one JSON object per event")
    tail.add_argument("--count", type=int, default=None, metavar="N", help="stop after N events")
    tail.add_argument("--data-dir", type=Path, default=None,
                      help="with --since-seq: where the history archive is (events system/cleanup moved out of the "
                      "WAL are read from it first), file://<data-dir>/objects unless NOETL_OBJECTS_URL "
                      f"(env NOETL_DATA_DIR; default {default_data_dir()})")
    add_topology_options(tail)
    add_log_options(tail)
    p.set_defaults(run="edge.cli.events")


def _cluster(sub: Subparsers) -> None:
    p = sub.add_parser(
        "cluster",
        help="a local N-node NATS cluster (up, status, down) and replica counts (bootstrap, replicas)",
        description="Run a real nats-server cluster on this machine from the same configs as nats/cluster/ "
        "(no docker), bootstrap a topology on any cluster, change a deployment's replica count. "
        "What `up` starts is recorded in <data-dir>/cluster.json; `status` and `down` read it.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    data_dir_help = "the cluster's directory: node stores, cluster.json, topology.yaml (default <NOETL_DATA_DIR>/cluster)"
    up = actions.add_parser(
        "up",
        help="start the nodes, wait for a JetStream meta leader, bootstrap, print URLs and a ready line",
        description="Start N nats-server nodes on free 127.0.0.1 ports (detached: they outlive this command), wait "
        "for a JetStream meta leader, bootstrap every shard's streams and buckets with the replica count, write "
        "<data-dir>/topology.yaml and print 'node <name> <nats-url> <monitor-url>' lines, then "
        "'ready <url,url,...> <topology file>'. On an existing directory, only the nodes not running are "
        "restarted, on their recorded ports and stores.",
    )
    up.add_argument("--nodes", type=int, default=3, help="number of servers (default 3)")
    up.add_argument("--shards", type=int, default=4, help="shard count (default 4)")
    up.add_argument("--replicas", type=int, default=None,
                    help="replicas of every stream and bucket: 1, 3 or 5 (default 3, or 1 with fewer than 3 nodes); "
                    "an existing cluster keeps its own (see `cluster replicas`)")  # fmt: skip
    status = actions.add_parser(
        "status", help="nodes, stream leaders and followers, consumer lag",
        description="Print tables of the nodes (pid, health, meta leader), every stream's leader and followers "
        "(current or behind, lag) and every consumer's lag. Exit code 1 when a node is down.",
    )  # fmt: skip
    status.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    actions.add_parser("down", help="stop the nodes `up` started (SIGTERM, SIGKILL after --timeout)",
                       description="Stop every running node recorded in <data-dir>/cluster.json; the stores stay.")
    boot = actions.add_parser(
        "bootstrap", help="create missing streams and buckets with the topology's replica count (idempotent)",
        description="Bootstrap a topology on any NATS deployment (the local cluster of --data-dir unless "
        "--topology or --nats-url is given). Existing assets that differ are reported, never changed.",
    )  # fmt: skip
    replicas = actions.add_parser(
        "replicas", help="change the replica count of every stream and bucket of an existing deployment",
        description="The one explicit way to change replicas: JetStream updates each stream in place (peers are "
        "added or removed by the servers). Needs at least COUNT servers.",
    )  # fmt: skip
    replicas.add_argument("count", type=int, metavar="COUNT", help="1, 3 or 5")
    for a in (boot, replicas):
        add_topology_options(a)
    for a in actions.choices.values():
        a.add_argument("--data-dir", type=Path, default=None, help=data_dir_help)
        a.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (default 30)")
        add_log_options(a)
    p.set_defaults(run="edge.cli.cluster")


def _history(sub: Subparsers) -> None:
    p = sub.add_parser(
        "history",
        help="the tiers of execution history (WAL, KV, archive): `history stats`, `history archive --now`",
        description="Executions' histories live in the shard's WAL until system/cleanup archives the ended ones "
        "(NOETL_HISTORY_RETENTION, default 7d) into Arrow IPC segments under <objects>/history/shard=<n>/. "
        "See docs/history.md.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = actions.add_parser(
        "stats", help="per shard: executions in the WAL and archived, WAL messages/bytes/subjects, KV keys, object bytes",
        description="Per shard: the WAL stream as the server counts it (messages, bytes, subjects, first and last "
        "seq, interior deletes), the executions whose subjects it holds and how many of them ended, the keys and "
        "bytes of KV proj_<n> and hist_<n> (hist keys = executions archived), and the history and snapshot "
        "segments in the object store. Rich tables on a terminal, else one JSON object (or with --json).",
    )  # fmt: skip
    stats.add_argument("--json", action="store_true", help="one JSON object even on a terminal")
    stats.add_argument("--results", action="store_true",
                       help="also count the stored step results (a walk of <objects>/results/: slow on large stores)")
    archive = actions.add_parser(
        "archive", help="archive every ended execution now, ignoring the retention (--now)",
        description="Find every execution with a terminal event (execution.completed, .failed or .cancelled) in "
        "the WAL, write its whole stored history to history segments (--batch executions per segment), read it "
        "back and verify it, record it in KV hist_<n>, then purge it from the WAL, whatever "
        "NOETL_HISTORY_RETENTION says. Safe while kernels run: the archive ref is written compare-and-set and an "
        "execution already archived is skipped, so this command and system/cleanup never lose or double an event. "
        "A progress bar on a terminal, then 'archived N executions, M messages, K segments' (or --json).",
    )  # fmt: skip
    archive.add_argument("--now", action="store_true", required=True,
                         help="archive what has ended now (required: the retention-driven archive is system/cleanup's)")
    archive.add_argument("--idle", default=None, metavar="DURATION",
                         help="also archive executions that never ended and have had no event for DURATION (30s, 12h, "
                         "7d…): the idle-age rule for raw event streams; an event that comes later is read after the archive")
    archive.add_argument("--tenant", default=None, help="only this tenant's executions")
    archive.add_argument("--project", default=None, help="only this project's executions (needs --tenant)")
    archive.add_argument("--batch", type=int, default=500, metavar="N", help="executions per segment (default 500)")
    archive.add_argument("--json", action="store_true", help="the summary as one JSON object")
    for a in (stats, archive):
        a.add_argument("--shard", type=int, default=None, metavar="N", help="only shard N (default every shard)")
        a.add_argument("--data-dir", type=Path, default=None,
                       help=f"base of the default file:// object store (env NOETL_DATA_DIR; default {default_data_dir()}); "
                       "NOETL_OBJECTS_URL overrides it")  # fmt: skip
        add_topology_options(a)
        add_log_options(a)
    p.set_defaults(run="edge.cli.history")


def _credential(sub: Subparsers) -> None:
    p = sub.add_parser(
        "credential",
        help="the keychain: set, list, show, delete, rotate credentials by alias; rewrap under a new platform key",
        description="Credentials live encrypted in KV 'keychain' (one key per tenant, project and alias, versioned), "
        "under the platform key (NOETL_KEYCHAIN_KEY, NOETL_KEYCHAIN_KEY_FILE or <data-dir>/keychain.key). "
        "No command takes a value as an argument or prints one. See docs/keychain.md.",
    )  # fmt: skip
    p.set_defaults(run="edge.cli.credential")
    commands = p.add_subparsers(dest="credential_command", required=True, metavar="SUBCOMMAND")
    put = commands.add_parser(
        "set", help="store a credential's next version (the value from stdin or --from-file)",
        description="Read the value from stdin (one trailing newline dropped; a prompt without echo on a terminal) "
        "or --from-file PATH (verbatim), 1 to 16384 bytes, and store it as the alias's next version. Prints its metadata.",
    )  # fmt: skip
    rotate = commands.add_parser(
        "rotate", help="like set, for an alias that exists (exit 1 if it does not)",
        description="Store a new version of an existing credential; runs after it resolve the new version.",
    )  # fmt: skip
    show = commands.add_parser("show", help="one credential's metadata (never the value)",
                               description="alias, version, created_at, key id and size; exit 1 if the alias is not set.")
    delete = commands.add_parser("delete", help="remove a credential and every version of it",
                                 description="Purge the alias's versions from KV 'keychain'; exit 1 if it is not set.")
    ls = commands.add_parser("list", help="credentials' metadata: one project (--tenant and --project) or every one")
    rewrap = commands.add_parser(
        "rewrap", help="re-wrap every credential's data key under a new platform key; prints the count",
        description="Unwrap each data key with the current platform key (or NOETL_KEYCHAIN_OLD_KEY_FILES) and wrap "
        "it under the new one (--new-key-file PATH or NOETL_KEYCHAIN_NEW_KEY, base64 of 32 bytes), compare-and-set "
        "per credential; values are not re-encrypted, older versions are dropped. Then make the new key every "
        "process's platform key.",
    )  # fmt: skip
    rewrap.add_argument("--new-key-file", default=None, metavar="PATH", help="the new platform key (base64 of 32 bytes)")
    for q in (put, rotate):
        q.add_argument("--from-file", default=None, metavar="PATH", help="read the value from PATH (verbatim) instead of stdin")
        # Caught only to refuse them without echoing the value back (argparse would print it).
        q.add_argument("given", nargs="*", help=argparse.SUPPRESS)
        q.add_argument("--value", default=None, help=argparse.SUPPRESS)
    for q in (put, rotate, show, delete):
        q.add_argument("--tenant", required=True, help=TENANT_HELP)
        q.add_argument("--project", required=True, help=PROJECT_HELP)
        q.add_argument("--alias", required=True, help="the credential's alias (lowercase letters, digits, '_' or '-')")
    ls.add_argument("--tenant", default=None, help="only this tenant's credentials (with --project)")
    ls.add_argument("--project", default=None, help="only this project's credentials (with --tenant)")
    for q in (show, ls):
        q.add_argument("--json", action="store_true", help="JSON even on a terminal")
    for q in (put, rotate, show, delete, ls, rewrap):
        q.add_argument("--data-dir", type=Path, default=None,
                       help=f"where <data-dir>/keychain.key is (env NOETL_DATA_DIR; default {default_data_dir()})")
        add_topology_options(q)
        add_log_options(q)


def _schedule(sub: Subparsers) -> None:
    p = sub.add_parser(
        "schedule",
        help="schedules: start a playbook on a cron expression (in a time zone) or every N seconds",
        description="Schedules live in KV 'schedules'; the kernel holding the shard of a schedule's tenant, project "
        "and affinity fires each tick once (the tick's execution id is derived from the schedule and the tick). "
        "See docs/schedules.md.",
    )  # fmt: skip
    p.set_defaults(run="edge.cli.schedule")
    commands = p.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")
    create = commands.add_parser(
        "create", help="validate and store a schedule (exit 2 on bad input or an unregistered playbook, nothing stored)",
        description="Give --cron (5 fields, or 6 with seconds last; --timezone an IANA name, default UTC) or --every "
        "(2s, 15m, 1h, 1d). The playbook must be registered (without --version each tick runs the latest). A tick "
        "at most --grace seconds late still fires; older ones were missed: --catchup none skips them, last fires "
        "the newest once. --overlap skip does not fire while the previous tick's execution is still going.",
    )  # fmt: skip
    create.add_argument("--id", required=True, help="the schedule's id in the project (a name: lowercase letters, digits, '_' or '-')")
    create.add_argument("--playbook", required=True, metavar="PATH", help="the registered playbook's path, e.g. etl/daily")
    create.add_argument("--version", type=int, default=None, metavar="N", help="the playbook version (default: the latest at each tick)")
    when = create.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", default=None, metavar="EXPR", help="a cron expression, e.g. '0 2 * * *'")
    when.add_argument("--every", default=None, metavar="INTERVAL", help="an interval: seconds, or 2s, 15m, 1h, 1d")
    create.add_argument("--timezone", default="UTC", metavar="ZONE", help="the cron expression's IANA time zone (default UTC)")
    create.add_argument("--workload", default=None, metavar="JSON", help="a JSON object merged over the playbook's workload")
    create.add_argument("--affinity", default="", help="the executions' affinity (part of the shard key; default none)")
    create.add_argument("--overlap", choices=["skip", "allow"], default="skip",
                        help="skip (default): no tick fires while the previous tick's execution runs; allow: fire anyway")
    create.add_argument("--catchup", choices=["none", "last"], default="none",
                        help="after downtime: none (default) skips missed ticks; last fires the newest missed tick once")
    create.add_argument("--grace", type=int, default=60, metavar="S",
                        help="a tick at most S seconds late still fires (default 60, 1..86400)")
    create.add_argument("--paused", action="store_true", help="create it paused (resume starts it)")
    ls = commands.add_parser("list", help="the project's schedules with their next and last tick",
                             description="Print the project's schedules (a table on a terminal, else JSON).")
    actions = {
        "show": "one schedule: its definition, next tick, last tick and last execution (exit 1 if unknown)",
        "pause": "stop firing a schedule until resume (exit 1 if unknown)",
        "resume": "fire a paused schedule again, from its next tick on: ticks during the pause are not caught up",
        "delete": "remove a schedule and its progress; it fires no more (exit 1 if unknown)",
    }
    others = [commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".") for name, text in actions.items()]
    for q in others:
        q.add_argument("id", metavar="ID", help="the schedule's id")
    for q in (create, ls, *others):
        q.add_argument("--tenant", required=True, help=TENANT_HELP)
        q.add_argument("--project", required=True, help=PROJECT_HELP)
        q.add_argument("--json", action="store_true", help="JSON even on a terminal")
        add_topology_options(q)
        add_log_options(q)


def _executions(sub: Subparsers) -> None:
    p = sub.add_parser(
        "executions",
        help="find executions: `executions list` pages a project's executions, newest first, with filters",
        description="Executions of a tenant/project from the visibility index (KV vis_<shard>, the hot ones) and "
        "the archive's index (the archived ones), every shard (affinities spread a project over shards). "
        "See docs/api.md, GET …/executions.",
    )  # fmt: skip
    p.set_defaults(run="edge.cli.executions")
    actions = p.add_subparsers(dest="executions_command", required=True, metavar="SUBCOMMAND")
    ls = actions.add_parser(
        "list", help="a page of executions, newest first (a table on a terminal, else JSON)",
        description="Print one page of the project's executions, newest first by execution id, with each one's "
        "status, playbook@version, created, updated and ended times, step counts by status and last seq "
        "(a table on a terminal, else JSON {executions, next_page_token}). A page may hold fewer than --limit "
        "and still have a next page: pass --page-token to go on, or --all for every page. "
        "Exit 2 on a bad filter, before connecting.",
    )  # fmt: skip
    ls.add_argument("--tenant", required=True, help=TENANT_HELP)
    ls.add_argument("--project", required=True, help="the tenant's project, e.g. web")
    ls.add_argument("--status", action="append", default=[], metavar="STATUS",
                    help="only these statuses (PENDING, RUNNING, WAITING, COMPLETED, FAILED, CANCELLED; any case), "
                    "comma-separated or repeated")
    ls.add_argument("--playbook", default=None, metavar="PATH", help="only executions of this playbook path, e.g. etl/daily")
    ls.add_argument("--since", default=None, metavar="WHEN",
                    help="created at or after: an RFC 3339 time with a zone (2026-12-04T18:00:00Z) or an execution id")
    ls.add_argument("--until", default=None, metavar="WHEN", help="created before: an RFC 3339 time with a zone or an execution id")
    ls.add_argument("--limit", default="50", metavar="N", help="at most N executions per page, 1..500 (default 50)")
    ls.add_argument("--page-token", default=None, metavar="TOKEN", help="go on from a page's next_page_token (same filters)")
    ls.add_argument("--all", action="store_true", help="every page, to the end (a long project prints a long list)")
    ls.add_argument("--json", action="store_true", help="JSON even on a terminal")
    ls.add_argument("--data-dir", type=Path, default=None,
                    help="where the archive's index is read from (file://<data-dir>/objects unless NOETL_OBJECTS_URL; "
                    f"default {default_data_dir()})")
    add_topology_options(ls)
    add_log_options(ls)
