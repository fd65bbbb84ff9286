"""The STREAMSVC_ALLOWED_TABLES allow-list: which tables (and columns) operations may touch."""

from __future__ import annotations

import re
from typing import NamedTuple

from streamsvc.errors import ConfigError

_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_ENTRY = re.compile(
    rf"^\s*(?:(?P<schema>{_IDENT})\.)?(?P<table>{_IDENT})\s*(?:\((?P<cols>[^)]*)\))?\s*$"
)


class TableRef(NamedTuple):
    """A table by schema and name, exactly as stored in the catalog."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def quoted(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's quote_ident does, always."""
    return '"' + name.replace('"', '""') + '"'


class AllowList:
    """Tables operations may touch; per table either every column (None) or a set."""

    def __init__(self, tables: dict[TableRef, frozenset[str] | None]) -> None:
        self.tables = tables
        self._resolved: dict[str, TableRef | None] = {}

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """Parse ``orders, public.payments(id,amount)``; unqualified names mean ``public``."""
        tables: dict[TableRef, frozenset[str] | None] = {}
        for raw in _split_entries(text):
            match = _ENTRY.match(raw)
            if match is None:
                raise ConfigError(
                    f"STREAMSVC_ALLOWED_TABLES: {raw.strip()!r} is not `table`, "
                    "`schema.table` or `table(col,col)`"
                )
            ref = TableRef(match["schema"] or "public", match["table"])
            cols = match["cols"]
            if cols is None:
                tables[ref] = None
                continue
            names = [c.strip() for c in cols.split(",") if c.strip()]
            bad = [n for n in names if not re.fullmatch(_IDENT, n)]
            if bad or not names:
                raise ConfigError(
                    f"STREAMSVC_ALLOWED_TABLES: column list of {ref} must be identifiers, "
                    f"got {cols!r}"
                )
            tables[ref] = frozenset(names)
        return cls(tables)

    def resolve(self, name: str) -> TableRef | None:
        """The allowed table a caller's ``table`` string names, or None."""
        try:
            return self._resolved[name]
        except KeyError:
            pass
        schema, _, table = name.rpartition(".")
        ref = TableRef(schema or "public", table)
        found = ref if ref in self.tables else None
        if len(self._resolved) < 10_000:  # names callers send: few, but not trusted to be
            self._resolved[name] = found
        return found

    def column_allowed(self, table: TableRef, column: str) -> bool:
        cols = self.tables.get(table)
        return cols is None or column in cols

    def __bool__(self) -> bool:
        return bool(self.tables)


def _split_entries(text: str) -> list[str]:
    """Split on commas that are not inside a column list."""
    entries: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    entries.append(text[start:])
    return [e for e in entries if e.strip()]
