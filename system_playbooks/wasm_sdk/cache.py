"""Built modules of the project's own guest sources, cached by the digest of everything that goes into them.

A system playbook with ``runtime: wasm`` ships its source, never a ``.wasm``:
the first use builds it with :func:`worker.toolchain.build` (the ``ziglang``
wheel) into the cache directory (``$NOETL_WASM_CACHE``, default
``~/.cache/noetl-edge/wasm``) under the sha256 of the source, the SDK files, the
defines, the compiler command and the ziglang version; later uses read it back.
A changed source or SDK is a new digest, so a stale module is never picked up.

>>> digest = source_digest(SDK / "noetl_arrow.c")
>>> len(digest), digest == source_digest(SDK / "noetl_arrow.c"), digest == source_digest(SDK / "noetl_arrow.c", defines=["X"])
(64, True, False)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from worker.toolchain import SDK, BuildError, build, build_command

CACHE_ENV = "NOETL_WASM_CACHE"


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "noetl-edge" / "wasm"


def source_digest(src: Path, *, defines: Sequence[str] = ()) -> str:
    """sha256 (hex) of what a build of ``src`` depends on."""
    h = hashlib.sha256()
    command = build_command(Path("src" + src.suffix), Path("out.wasm"), defines=defines)[1:]  # not the interpreter path
    for part in [*command, importlib.metadata.version("ziglang")]:
        h.update(part.encode() + b"\0")
    for path in [src, *sorted(p for p in SDK.iterdir() if p.suffix in (".c", ".h"))]:
        data = path.read_bytes()
        h.update(f"{path.name}:{len(data)}\0".encode() + data)
    return h.hexdigest()


def built(src: Path, *, defines: Sequence[str] = (), cache: Path | None = None) -> bytes:
    """The module built from ``src``: from the cache, or compiled now (:class:`BuildError` if that fails)."""
    try:
        digest = source_digest(src, defines=defines)
    except OSError as e:
        raise BuildError(f"cannot build {src}: {e}") from e
    directory = cache if cache is not None else cache_dir()
    path = directory / f"{src.stem}-{digest}.wasm"
    if path.is_file():
        return path.read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{path.name}.{uuid.uuid4().hex}.partial"
    try:
        build(src, partial, defines=defines)
        os.replace(partial, path)  # concurrent builders each write their own file; the last rename wins, same bytes
    finally:
        partial.unlink(missing_ok=True)
    return path.read_bytes()
