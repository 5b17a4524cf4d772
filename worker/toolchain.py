"""Compile plug-in sources (C or Zig) to ``wasm32`` with the ``ziglang`` wheel: what ``noetl-edge plugin build`` runs.

C sources get the guest SDK (``system_playbooks/wasm_sdk``) on the include
path; when a source includes ``noetl_arrow.h`` the SDK's Arrow reader/writer
is compiled in too. The module exports ``memory``, ``alloc`` and ``run`` and
has no entry point and no libc (``wasm32-freestanding``).

>>> build_command(Path("score.c"), Path("score.wasm"))[3:6]
['cc', '--target=wasm32-freestanding', '-O2']
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from kernel.errors import KernelError

__all__ = ["SDK", "BuildError", "build", "build_command"]

SDK: Final = Path(__file__).resolve().parent.parent / "system_playbooks" / "wasm_sdk"
TIMEOUT_S: Final = 300.0


class BuildError(KernelError):
    """A plug-in source could not be compiled; ``output`` holds what the compiler said."""

    def __init__(self, message: str, *, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def _sdk_sources(src: Path) -> list[str]:
    try:
        text = src.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise BuildError(f"cannot read {src}: {e}") from e
    arrow = SDK / "noetl_arrow.c"
    return [str(arrow)] if '"noetl_arrow.h"' in text and arrow.is_file() else []


def build_command(src: Path, out: Path, *, defines: Sequence[str] = ()) -> list[str]:
    """The compiler command line for ``src`` (``.c`` or ``.zig``) writing ``out``."""
    zig = [sys.executable, "-m", "ziglang"]
    if src.suffix == ".c":
        flags = ["cc", "--target=wasm32-freestanding", "-O2", "-nostdlib", "-Wl,--no-entry", "-Wl,--export=alloc",
                 "-Wl,--export=run", "-I", str(SDK), *(f"-D{d}" for d in defines)]  # fmt: skip
        return [*zig, *flags, "-o", str(out), str(src)]
    if src.suffix == ".zig":
        return [*zig, "build-exe", str(src), "-target", "wasm32-freestanding", "-fno-entry", "-rdynamic",
                "-O", "ReleaseSmall", f"-femit-bin={out}"]  # fmt: skip
    raise BuildError(f"cannot build {src}: expected a .c or .zig source")


def build(src: Path, out: Path | None = None, *, defines: Sequence[str] = ()) -> Path:
    """Compile ``src`` to ``out`` (default: beside it, ``.wasm``); :class:`BuildError` with the compiler's output."""
    if not src.is_file():
        raise BuildError(f"cannot build {src}: no such file")
    out = out if out is not None else src.with_suffix(".wasm")
    command = build_command(src, out, defines=defines)
    if src.suffix == ".c":
        command += _sdk_sources(src)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"cannot run the zig compiler for {src}: {e}") from e
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        first = next((line for line in output.splitlines() if "error" in line), output.splitlines()[0] if output else "")
        raise BuildError(f"compiling {src} failed: {first}", output=output)
    return out
