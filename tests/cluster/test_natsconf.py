from __future__ import annotations

import subprocess
from pathlib import Path

from natscluster.natsbin import find_nats_server
from natscluster.natsconf import render_server_config
from locator import default_topology

NATS_DIR = Path(__file__).resolve().parent.parent.parent / "nats"


def test_committed_single_node_config_matches_the_renderer() -> None:
    rendered = render_server_config(
        topology=default_topology(),
        server_name="noetl-local",
        host="127.0.0.1",
        port=4222,
        monitor_port=8222,
        store_dir="./data/jetstream",
    )
    assert (NATS_DIR / "single-node.conf").read_text() == rendered


def test_nats_server_accepts_the_committed_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(NATS_DIR / "single-node.conf")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    # The same check does reject a broken mapping (token 9 does not exist in the source).
    broken = tmp_path / "broken.conf"
    broken.write_text('mappings = { "in.*.*.>": "wal.{{partition(4,9)}}.>" }\n')
    bad = subprocess.run([str(find_nats_server()), "-t", "-c", str(broken)], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0


def test_sync_interval_and_payload_rendered() -> None:
    text = render_server_config(
        topology=default_topology(shard_count=7), server_name="n", host="127.0.0.1", port=1, monitor_port=2,
        store_dir="/s", max_payload=2_000_000, sync_interval="always",
    )
    assert 'sync_interval: "always"' in text and "max_payload: 2000000" in text and "partition(7,1,2)" in text
