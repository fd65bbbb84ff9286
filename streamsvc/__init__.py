"""streamsvc: a batch service that lands database operations in PostgreSQL, exactly once."""

__version__ = "0.1.0"
