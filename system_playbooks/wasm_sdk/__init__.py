"""The guest SDK (C headers and sources for ``wasm32`` plug-ins) and the cached build of the project's own guests."""
