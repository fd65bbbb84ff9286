"""Pure: turn a batch of operations into as few statements as possible.

Structured operations with the same table, action and columns merge into one multi-row
statement fed by a single JSON parameter (``json_to_recordset``), so PostgreSQL parses the
values with its own input functions and reports bad ones in its own words. Statement
operations with the same SQL text form one group too: the text becomes a format()
template (``caller_template``) that PostgreSQL fills with each operation's parameters,
quoted as literals, and runs once per operation. Every statement runs inside PostgreSQL,
as the caller role (sql/apply_rows.sql, streamsvc.adapters.caller_role).

Order: groups run in the order they were first needed. An operation never joins a group
that would move it ahead of an earlier operation on the same row (same table and key), and
a multi-row UPDATE/UPSERT/DELETE never holds the same row twice, so operations on one row
keep their submission order within a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pglast import parser

from streamsvc import sqlguard
from streamsvc.allowlist import TableRef, quote_ident
from streamsvc.catalog import Catalog, Table
from streamsvc.errors import InvalidOperation, PermanentError
from streamsvc.model import BodyKind, Operation, WorkOp, json_encoder

Signature = tuple[Hashable, ...]
RowKey = tuple[TableRef, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class Group:
    """Operations that can run as one statement."""

    signature: Signature
    members: list[WorkOp] = field(default_factory=list)
    rows: set[RowKey] = field(default_factory=set)

    def split(self) -> tuple[Group, Group]:
        half = len(self.members) // 2
        return (
            Group(self.signature, self.members[:half]),
            Group(self.signature, self.members[half:]),
        )


@dataclass(frozen=True, slots=True)
class Statement:
    """What PostgreSQL applies for a group: ``sql`` over ``rows``, a JSON array in text with
    one element per member. Either a multi-row statement taking them all as $1, or
    (``each``) a caller's statement as a format() template, run once per element, the
    element being that member's parameters."""

    sql: str
    rows: str
    each: bool = False


def plan(items: Sequence[WorkOp], catalog: Catalog) -> list[Group]:
    """Group ``items`` into statements, keeping per-row order (see the module docstring)."""
    groups: list[Group] = []
    open_by_signature: dict[Signature, int] = {}
    last_touch: dict[RowKey, int] = {}
    for item in items:
        signature = signature_of(item.op)
        row = _row_key(item.op, catalog)
        index = open_by_signature.get(signature)
        if index is None or (
            row is not None
            and (
                last_touch.get(row, -1) > index
                or (row in groups[index].rows and _one_row_each(item.op))
            )
        ):
            index = len(groups)
            groups.append(Group(signature))
            open_by_signature[signature] = index
        group = groups[index]
        group.members.append(item)
        if row is not None:
            group.rows.add(row)
            last_touch[row] = index
    return groups


def tables_of(groups: Sequence[Group], catalog: Catalog) -> list[str]:
    """The tables the groups write to, sorted: the order the batch locks them in."""
    names = set()
    for group in groups:
        op = group.members[0].op
        if op.kind is BodyKind.STRUCTURED:
            ref = catalog.allow.resolve(op.table or "")
        else:
            assert op.sql is not None
            try:
                ref = sqlguard.check_statement(op.sql, op.params, catalog.allow).table
            except InvalidOperation:  # the allow-list changed since: its statement fails alone
                ref = None
        if ref is not None:
            names.add(str(ref))
    return sorted(names)


def signature_of(op: Operation) -> Signature:
    if op.kind is not BodyKind.STRUCTURED:
        return ("sql", op.sql)
    return (
        "structured",
        op.table,
        op.action,
        tuple(sorted(op.values or ())),
        tuple(sorted(op.key or ())),
    )


def render(group: Group, catalog: Catalog) -> Statement:
    """The statement that applies every member of ``group``."""
    first = group.members[0].op
    if first.kind is not BodyKind.STRUCTURED:
        assert first.sql is not None
        params = [[param_text(p) for p in m.op.params or ()] for m in group.members]
        return Statement(caller_template(first.sql), json_encoder.encode(params).decode(), True)
    table = _table(first, catalog)
    values = sorted(first.values or ())
    keys = sorted(first.key or ())
    records = json_encoder.encode([_record(m.op, values, keys) for m in group.members]).decode()
    if first.action == "insert":
        return Statement(_insert_sql(table, values, None), records)
    if first.action == "upsert":
        return Statement(_insert_sql(table, values + keys, keys), records)
    rows = len(group.members)
    if first.action == "update":
        return Statement(_update_sql(table, values, keys, rows), records)
    return Statement(_delete_sql(table, keys, rows), records)


@functools.lru_cache(maxsize=1024)
def caller_template(sql: str) -> str:
    """A caller's statement as a format() template: each ``$n`` placeholder (as PostgreSQL's
    own scanner finds it, so not one inside a string or comment) becomes ``%n$L``, which
    format() replaces with the n-th parameter quoted as a literal (or NULL); every other
    ``%`` is doubled; a trailing ``;`` is dropped (the statement runs inside a WITH).
    A text the scanner cannot read raises, and its operation fails alone."""
    tokens = list(parser.scan(sql))
    end = len(sql)
    for token in reversed(tokens):
        if token.name == "ASCII_59":  # ;
            end = token.start
        elif token.name not in ("SQL_COMMENT", "C_COMMENT"):
            break
    parts, at = [], 0
    for token in tokens:
        if token.start >= end:
            break
        if token.name == "PARAM":
            parts.append(sql[at : token.start].replace("%", "%%"))
            parts.append(f"%{int(sql[token.start + 1 : token.end + 1])}$L")
            at = token.end + 1
    parts.append(sql[at:end].replace("%", "%%"))
    return "".join(parts)


def param_text(value: Any) -> str | None:
    """A JSON parameter in PostgreSQL's text input form; null is SQL NULL. Objects and
    arrays become JSON text (for json and jsonb columns)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json_encoder.encode(value).decode()


def _record(op: Operation, values: list[str], keys: list[str]) -> dict[str, Any]:
    """One record for json_to_recordset, fields named c0, c1, ... in column order."""
    record: dict[str, Any] = {}
    for i, name in enumerate(values):
        record[f"c{i}"] = (op.values or {})[name]
    for i, name in enumerate(keys, start=len(values)):
        record[f"c{i}"] = (op.key or {})[name]
    return record


def _recordset(table: Table, columns: list[str], rows: int | None = None) -> str:
    """The rows of $1 as ``r``. With ``rows``, their count as the planner's estimate: it
    takes json_to_recordset for 100 rows whatever it holds, and joins an UPDATE or DELETE
    of a few rows to a table of some thousands by scanning all of it (a hash join; 0.3 ms
    a statement on the bench's orders, 30 times an index probe per row). A LIMIT of the
    count (all the rows, or more when a failing statement is retried on part of them)
    lowers the estimate, and the rows are found by their key's index."""
    defs = ", ".join(f"c{i} {table.columns[name].type_sql}" for i, name in enumerate(columns))
    source = f"json_to_recordset($1::text::json) AS r({defs})"
    if rows is None:
        return source
    return f"(SELECT * FROM {source} LIMIT {rows}) AS r"


# Counts the rows an INSERT reaches, so a refused row is found without bisecting
# (sql/apply_rows.sql, which the connections of a flushing process create, says how).
# The condition holds for every row: it filters nothing.
COUNT_ROWS = "nextval('pg_temp.streamsvc_rows_reached') IS NOT NULL"


def _insert_sql(table: Table, columns: list[str], conflict: list[str] | None) -> str:
    names = ", ".join(quote_ident(c) for c in columns)
    picks = ", ".join(f"r.c{i}" for i in range(len(columns)))
    source = _recordset(table, columns)
    sql = f"INSERT INTO {table.ref.quoted} ({names}) SELECT {picks} FROM {source} "
    sql += f"WHERE {COUNT_ROWS}"
    if conflict is None:
        return sql
    target = ", ".join(quote_ident(c) for c in conflict)
    rest = [c for c in columns if c not in conflict]
    if not rest:
        return f"{sql} ON CONFLICT ({target}) DO NOTHING"
    sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in rest)
    return f"{sql} ON CONFLICT ({target}) DO UPDATE SET {sets}"


def _update_sql(table: Table, values: list[str], keys: list[str], rows: int) -> str:
    sets = ", ".join(f"{quote_ident(c)} = r.c{i}" for i, c in enumerate(values))
    where = _key_match(keys, start=len(values))
    return (
        f"UPDATE {table.ref.quoted} AS t SET {sets} "
        f"FROM {_recordset(table, values + keys, rows)} WHERE {where}"
    )


def _delete_sql(table: Table, keys: list[str], rows: int) -> str:
    where = _key_match(keys, start=0)
    source = _recordset(table, keys, rows)
    return f"DELETE FROM {table.ref.quoted} AS t USING {source} WHERE {where}"


def _key_match(keys: list[str], start: int) -> str:
    return " AND ".join(f"t.{quote_ident(c)} = r.c{i}" for i, c in enumerate(keys, start=start))


def _table(op: Operation, catalog: Catalog) -> Table:
    assert op.table is not None
    ref = catalog.allow.resolve(op.table)
    table = catalog.tables.get(ref) if ref is not None else None
    if table is None:
        raise PermanentError(f"table {op.table!r} is not an allowed, existing table")
    for name in (*(op.values or ()), *(op.key or ())):
        if name not in table.columns:
            raise PermanentError(f'column "{name}" of relation "{table.ref.name}" does not exist')
    return table


def _one_row_each(op: Operation) -> bool:
    """Statements that fail or misbehave when one row appears twice in them."""
    return op.action in ("update", "upsert", "delete")


def _row_key(op: Operation, catalog: Catalog) -> RowKey | None:
    if op.kind is not BodyKind.STRUCTURED or op.table is None:
        return None
    ref = catalog.allow.resolve(op.table)
    table = catalog.tables.get(ref) if ref is not None else None
    if ref is None or table is None:
        return None
    source = op.key if op.action != "insert" else op.values
    columns = table.primary_key if op.action == "insert" else tuple(sorted(op.key or ()))
    if not source or not columns or any(c not in source for c in columns):
        return None
    return ref, tuple((c, _key_text(source[c])) for c in columns)


def _key_text(value: Any) -> str:
    """A key value as text; 1 and "1" name the same row, as PostgreSQL would read them."""
    if isinstance(value, dict | list):
        return json_encoder.encode(value).decode()
    return str(value)
