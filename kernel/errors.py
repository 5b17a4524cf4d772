"""The one error root of the kernel package and its typed subclasses."""

from __future__ import annotations


class KernelError(RuntimeError):
    """Root of every runtime failure the kernel reports (server, bootstrap, publish)."""


class ConfigError(KernelError):
    """A setting (flag, environment variable, file) has a bad value; nothing was started."""


class TopologyMismatch(ConfigError):
    """The server's streams were bootstrapped for another topology (for example another shard count)."""


class ServerBinaryNotFound(KernelError):
    """No ``nats-server`` executable could be found."""


class ServerStartError(KernelError):
    """The embedded ``nats-server`` did not become healthy."""


class BootstrapMismatch(KernelError):
    """An existing stream or bucket differs from what the topology asks for; nothing was replaced."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "existing JetStream assets differ from the topology (nothing was changed): " + "; ".join(problems)
        )
        self.problems = problems


class PublishError(KernelError):
    """The server refused an event, or never acknowledged it (so it is not known to be written)."""
