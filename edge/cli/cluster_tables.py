"""``noetl-edge cluster status`` as rich tables: nodes, stream leaders and followers, consumer lag."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from natscluster.status import ClusterStatus


def status_tables(status: ClusterStatus) -> list[Table]:
    """The three tables ``cluster status`` prints.

    >>> from natscluster.status import NodeStatus
    >>> node = NodeStatus(name="n1", pid=7, client_url="nats://h:1", monitor_url="http://h:2", healthy=True,
    ...                   meta_leader=True)
    >>> [t.title for t in status_tables(ClusterStatus(nodes=[node], streams=[], consumers=[]))]
    ['nodes', 'streams', 'consumers']
    """
    nodes = Table("node", "pid", "state", "client", "monitor", "meta leader", title="nodes")
    for n in status.nodes:
        state = "up" if n.healthy else ("not answering" if n.pid else "down")
        nodes.add_row(n.name, str(n.pid or "-"), state, n.client_url, n.monitor_url, "*" if n.meta_leader else "")
    streams = Table("stream", "leader", "followers (current, lag)", "messages", "last seq", title="streams")
    for s in status.streams:
        followers = ", ".join(f"{name} ({'current' if cur else 'behind'}, {lag})" for name, cur, lag in s.followers)
        streams.add_row(s.name, s.leader or "-", followers or "-", str(s.messages), str(s.last_seq))
    consumers = Table("stream", "consumer", "leader", "lag (pending)", "ack pending", title="consumers")
    for c in status.consumers:
        consumers.add_row(c.stream, c.name, c.leader or "-", str(c.pending), str(c.ack_pending))
    return [nodes, streams, consumers]


def print_status(status: ClusterStatus) -> None:
    console = Console(width=160)
    for table in status_tables(status):
        console.print(table)
