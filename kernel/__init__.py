"""The resident minimum: NATS connection, bootstrap, producer, consumer pump, scheduler, leases, plug-in host, scrub.

No domain logic lives here: events are interpreted by ``projector`` and the system playbooks. The data
worker, its tools and the WASM host live in ``worker``; nats-server nodes and clusters in ``natscluster``.
"""
