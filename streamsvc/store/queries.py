"""The named queries of sql/queries.sql, read once."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: ([a-z_]+)$", re.MULTILINE)


def load(text: str) -> dict[str, str]:
    """Each query of ``text`` by name: the lines between its ``-- name:`` line and the
    next, without the comment lines."""
    parts = _NAME.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"queries.sql: {name} is defined twice")
        lines = [line for line in body.splitlines() if not line.startswith("--")]
        found[name] = "\n".join(lines).strip()
    return found


QUERIES = load(resources.files("streamsvc.sql").joinpath("queries.sql").read_text())
