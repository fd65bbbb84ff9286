"""Logging set up once: JSON lines on stderr, at LOG_LEVEL, with stable event names.

streamsvc logs through structlog. Every other logger (uvicorn's, aio-pika's, asyncpg's,
litestar's, OpenTelemetry's exporters', and Python warnings) goes through the standard
library's root logger, whose one handler renders with the same processors: every line the
process writes is one JSON object with ``event``, ``level`` and ``timestamp`` (and
``logger`` for the standard library's). Lines about one batch carry ``batch_id`` (bound
per batch transaction with structlog.contextvars), lines about one operation its ``id``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"warn": "warning"}


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root logger's handler this module installs (and replaces when called again)."""


def configure(level: str = "info") -> None:
    numeric = getattr(logging, _LEVELS.get(level, level).upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = _Handler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
