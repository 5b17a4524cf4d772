"""structlog set-up: JSON lines on stderr when not a TTY, readable console lines when it is."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from kernel.masking import mask_log_event

Format = Literal["auto", "json", "console"]


class _Stderr:
    """Resolves ``sys.stderr`` at each write, so a swapped stream (tests, daemons) is honoured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, level: str = "info", fmt: Format = "auto") -> None:
    """Configure structlog for the process; results go to stdout, logs always to stderr."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)")
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_log_event,  # a credential resolved for the tool call running here never reaches a log line
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
