"""What a long-running process (``up``, ``kernel``, ``edge``, ``worker``) sets for itself once, at start.

The event loop is :func:`kernel.connect.install_uvloop`'s; this module tunes CPython's cyclic
garbage collector, which these processes otherwise pay for on every few hundred allocations.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

from kernel.errors import ConfigError

# Allocations (less deallocations) between two collections of the youngest generation; CPython's own is 700.
DEFAULT_GC_THRESHOLD = 50_000
# Collections of a generation between two of the next one (CPython's own: 10 and 10).
OLDER_GC_THRESHOLDS = (20, 100)


def tune_gc(environ: Mapping[str, str] = os.environ) -> int:
    """Collect less often, and never scan what start-up built; returns the youngest generation's threshold.

    A kernel, an edge or a worker allocates a few objects for every event (envelopes, acks, futures) and
    holds many for long (remembered projections, the mirror's entries, decoded envelopes). At CPython's
    defaults `up`'s kernel process spent 11.2 s of its 32.0 s of CPU collecting, over 10,000 orchestrated
    five-step executions; 0.7 s with these. ``NOETL_GC_THRESHOLD`` sets the youngest generation's threshold
    (``700`` is CPython's own; ``0`` turns automatic collection off).

    >>> before = gc.get_threshold()
    >>> tune_gc({"NOETL_GC_THRESHOLD": "700"}), gc.get_threshold()
    (700, (700, 20, 100))
    >>> gc.unfreeze(); gc.set_threshold(*before)
    """
    raw = environ.get("NOETL_GC_THRESHOLD", "")
    try:
        threshold = DEFAULT_GC_THRESHOLD if raw == "" else int(raw)
    except ValueError:
        raise ConfigError(f"NOETL_GC_THRESHOLD must be a whole number of allocations, got {raw!r}") from None
    if threshold < 0:
        raise ConfigError(f"NOETL_GC_THRESHOLD must be 0 (no automatic collection) or more, got {threshold}")
    gc.freeze()  # what start-up built (modules, settings, the app) lives as long as the process: never scanned
    gc.set_threshold(threshold, *OLDER_GC_THRESHOLDS)
    return threshold
