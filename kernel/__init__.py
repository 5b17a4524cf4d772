"""The resident minimum: NATS connection, bootstrap, producer, embedded server (and, later, the pump).

No domain logic lives here: events are interpreted by ``projector`` and the system playbooks.
"""
