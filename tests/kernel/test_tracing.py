from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kernel.producer import Producer
from locator import new_event
from locator.topology import Topology



async def test_publish_is_traced_with_execution_id(spans: InMemorySpanExporter, js: Any, topology: Topology) -> None:
    producer = Producer(js, topology)
    ack = await producer.publish(new_event(tenant="acme", project="web", execution_id="9", type="user.note"))
    await producer.publish_many([new_event(tenant="acme", project="web", execution_id="9", type="user.x")] * 3)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    single = by_name["wal.publish"]
    assert single.attributes is not None
    assert single.attributes["noetl.execution_id"] == "9" and single.attributes["noetl.stream"] == ack.stream
    batch = by_name["wal.publish_batch"]
    assert batch.attributes is not None and batch.attributes["noetl.batch_size"] == 3
