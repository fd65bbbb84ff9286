"""structlog set up once: JSON lines on stderr, at LOG_LEVEL, with stable event names."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"warn": "warning"}


def configure(level: str = "info") -> None:
    numeric = getattr(logging, _LEVELS.get(level, level).upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
