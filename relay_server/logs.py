"""Structured logging (structlog) as JSON lines or console text, stdlib loggers routed through it.

Log calls pass explicit fields only; no exception renderer that dumps frame locals is
configured, so key material held in local variables never reaches the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import structlog


def configure(fmt: str = "console", level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=shared + [structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))  # aiohttp access logs stay quiet unless warnings


def event_logger(name: str = "overlay-relay") -> Callable[..., None]:
    log = structlog.get_logger(name)

    def emit(event: str, level: str = "info", **fields: Any) -> None:
        getattr(log, level)(event, **fields)

    return emit
