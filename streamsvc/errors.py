"""One exception base for the project, with the two kinds the pipeline acts on.

Driver errors are translated into these at the adapter boundary; nothing above the
adapters catches asyncpg or redis exceptions directly.
"""

from __future__ import annotations


class StreamsvcError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(StreamsvcError):
    """A setting is missing or malformed; start-up stops with this one line."""


class NotMigratedError(StreamsvcError):
    """The database lacks the service's tables or is behind the code's migrations."""


class InvalidOperation(StreamsvcError):
    """An operation was refused before anything of it was stored.

    ``field`` names the offending JSON field (dotted for nested ones, e.g. ``values.price``)
    and ``reason`` says what is wrong with it, in words a caller can act on.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TransientError(StreamsvcError):
    """Worth retrying: connection lost, serialization failure, deadlock, timeout."""


class PermanentError(StreamsvcError):
    """Retrying will not help: constraint violation, bad value, unknown column."""
