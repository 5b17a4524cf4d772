"""The data worker: pulls commands from ``CMD_<shard>.<pool>``, runs them with a tool kind, reports on the WAL.

:mod:`.worker` is the generic loop, :mod:`.tools` the tool kinds (a registry of drivers), :mod:`.wasm` the
WASM host with its capability ring, :mod:`.plugins` the WASM plug-in registry, :mod:`.toolchain` the
``ziglang`` compiler front end, :mod:`.keychain` the credentials a step may resolve.
"""
