"""The live schema of the allowed tables: columns, their types, and their unique keys.

Loaded at start and refreshed when an operation names something the loaded copy does not
know (a column added since), at most once per ``min_refresh_s``. Identifiers used in
generated SQL come only from here, quoted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from streamsvc.allowlist import AllowList, TableRef


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_sql: str  # format_type() output: safe to splice, already quoted where needed
    writable: bool  # False for generated columns and identity ALWAYS


@dataclass(frozen=True, slots=True)
class Table:
    ref: TableRef
    columns: dict[str, Column]
    primary_key: tuple[str, ...] | None
    unique_keys: tuple[frozenset[str], ...]

    def is_unique_key(self, columns: frozenset[str]) -> bool:
        return columns in self.unique_keys


class Fetcher(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


COLUMNS_SQL = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
       a.attgenerated = '' AND a.attidentity <> 'a' AS writable
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN unnest($1::text[], $2::text[]) AS t(schema_name, table_name)
  ON t.schema_name = n.nspname AND t.table_name = c.relname
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
ORDER BY n.nspname, c.relname, a.attnum
"""

UNIQUE_SQL = """
SELECT n.nspname, c.relname, i.indisprimary,
       array(SELECT a.attname FROM unnest(i.indkey) AS k(attnum)
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum) AS cols
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN unnest($1::text[], $2::text[]) AS t(schema_name, table_name)
  ON t.schema_name = n.nspname AND t.table_name = c.relname
WHERE i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
"""


@dataclass
class Catalog:
    """The allow-list plus what the database says about each allowed table."""

    allow: AllowList
    tables: dict[TableRef, Table] = field(default_factory=dict)
    min_refresh_s: float = 1.0
    loaded_at: float = 0.0

    async def load(self, db: Fetcher) -> None:
        schemas = [ref.schema for ref in self.allow.tables]
        names = [ref.name for ref in self.allow.tables]
        columns: dict[TableRef, dict[str, Column]] = {}
        for schema, table, name, type_sql, writable in await db.fetch(COLUMNS_SQL, schemas, names):
            columns.setdefault(TableRef(schema, table), {})[name] = Column(name, type_sql, writable)
        keys: dict[TableRef, list[frozenset[str]]] = {}
        primary: dict[TableRef, tuple[str, ...]] = {}
        for schema, table, is_primary, cols in await db.fetch(UNIQUE_SQL, schemas, names):
            ref = TableRef(schema, table)
            keys.setdefault(ref, []).append(frozenset(cols))
            if is_primary:
                primary[ref] = tuple(cols)
        self.tables = {
            ref: Table(ref, cols, primary.get(ref), tuple(keys.get(ref, ())))
            for ref, cols in columns.items()
        }
        self.loaded_at = time.monotonic()

    async def refresh(self, db: Fetcher) -> bool:
        """Reload unless that was done very recently; True when it reloaded."""
        if time.monotonic() - self.loaded_at < self.min_refresh_s:
            return False
        await self.load(db)
        return True

    def missing_tables(self) -> list[TableRef]:
        """Allowed tables the database does not have (start-up warns about these)."""
        return [ref for ref in self.allow.tables if ref not in self.tables]
