"""Is this operation acceptable? Pure checks against the catalog and the caller's scope.

Every refusal is an InvalidOperation naming the JSON field and the reason; validation
never touches a server, so the ingress can refuse bad input before storing anything.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Any

from streamsvc import sqlguard
from streamsvc.allowlist import TableRef
from streamsvc.catalog import Catalog, Table
from streamsvc.errors import InvalidOperation
from streamsvc.model import (
    EARLIEST_RUN_AT,
    MAX_DEPTH,
    MAX_LABEL_BYTES,
    MAX_TYPE_BYTES,
    RUN_AT_HORIZON,
    Action,
    BodyKind,
    Operation,
)

ALL_ACTIONS: frozenset[str] = frozenset({"insert", "upsert", "update", "delete"})


class UnknownToCatalog(InvalidOperation):
    """Refused because the loaded schema lacks a table or column; a refresh may help."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who submits: a name for the record, and what they may touch."""

    name: str
    tables: frozenset[TableRef] | None = None  # None: every allowed table
    actions: frozenset[str] = ALL_ACTIONS
    allow_sql: bool = True
    admin: bool = False  # sees every caller's operations, not only its own
    rate_limit_ops: int | None = None  # per second; None: the service default, 0: none

    def may_touch(self, table: TableRef) -> bool:
        return self.tables is None or table in self.tables


ANONYMOUS = Caller(name="anonymous", admin=True)  # STREAMSVC_AUTH=off: everyone

# Which bodies an action needs: (values required, key required); absent ones are refused.
_SHAPE: dict[str, tuple[bool, bool]] = {
    "insert": (True, False),
    "upsert": (True, True),
    "update": (True, True),
    "delete": (False, True),
}


def validate(op: Operation, catalog: Catalog, caller: Caller) -> None:
    """Raise InvalidOperation unless ``op`` may be stored and later applied."""
    if op.run_at is not None and op.delay_ms is not None:
        raise InvalidOperation("delayMs", "give runAt or delayMs, not both")
    storable(op)
    if op.kind is BodyKind.STRUCTURED:
        _structured(op, catalog, caller)
    else:
        _statement(op, catalog, caller)


def storable(op: Operation, now: dt.datetime | None = None) -> None:
    """Raise InvalidOperation unless PostgreSQL, Redis and AMQP all take every field of
    ``op``: no NUL in any string (object keys too), labels short enough for an AMQP
    routing key and free of control characters, times in range, nesting bounded."""
    label("operationType", op.operation_type, MAX_TYPE_BYTES)
    if op.ordering_key is not None:
        label("orderingKey", op.ordering_key, MAX_LABEL_BYTES)
    if op.run_at is not None:
        run_at = op.run_at if op.run_at.tzinfo else op.run_at.replace(tzinfo=dt.UTC)
        latest = (now or dt.datetime.now(dt.UTC)) + RUN_AT_HORIZON
        if not EARLIEST_RUN_AT <= run_at <= latest:
            raise InvalidOperation(
                "runAt", f"must lie between {EARLIEST_RUN_AT:%Y-%m-%d} and a year from now"
            )
    for name in ("table", "sql", "api_key"):
        if "\x00" in (getattr(op, name) or ""):
            raise InvalidOperation(_CAMEL.get(name, name), "contains a NUL character")
    for name, value in (
        ("values", op.values),
        ("key", op.key),
        ("params", op.params),
        ("meta", op.meta),
    ):
        if value is not None:
            _plain_json(name, value)


_CAMEL = {"api_key": "apiKey"}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def label(field: str, text: str, max_bytes: int) -> None:
    """Refuse a label PostgreSQL, Redis or AMQP would not take: too long, or holding a
    control character (NUL included)."""
    if len(text.encode(errors="surrogatepass")) > max_bytes:
        raise InvalidOperation(field, f"longer than {max_bytes} bytes of UTF-8")
    if _CONTROL.search(text):
        raise InvalidOperation(field, "contains a control character")


def _plain_json(field: str, value: Any) -> None:
    """No NUL in any string or key of ``value``, at most MAX_DEPTH levels below the
    operation. Iterative: operations built in Python skip the pre-decode nesting check."""
    stack: list[tuple[Any, str, int]] = [(value, field, 2)]  # the operation is level 1
    while stack:
        item, where, level = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidOperation(where, "contains a NUL character")
        elif isinstance(item, dict | list):
            if level > MAX_DEPTH:
                raise InvalidOperation(field, f"nested deeper than {MAX_DEPTH} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for k, v in pairs:
                if isinstance(k, str) and "\x00" in k:
                    raise InvalidOperation(where, "contains a NUL character in a key")
                stack.append((v, f"{where}.{k}" if level == 2 else where, level + 1))


def _structured(op: Operation, catalog: Catalog, caller: Caller) -> None:
    if op.params is not None:
        raise InvalidOperation("params", "params go with sql, not with table/action")
    if op.table is None:
        raise InvalidOperation("table", "required: give table/action/values or sql")
    if op.action is None:
        raise InvalidOperation("action", "required: one of insert, upsert, update, delete")
    table = _table(op.table, catalog, caller)
    _scope(caller, table.ref, op.action)
    needs_values, needs_key = _SHAPE[op.action]
    _presence("values", op.values, needs_values, op.action)
    _presence("key", op.key, needs_key, op.action)
    allowed = catalog.allow
    for part, columns in (("values", op.values or {}), ("key", op.key or {})):
        for name, value in columns.items():
            column = table.columns.get(name)
            if column is None:
                raise UnknownToCatalog(f"{part}.{name}", f"no such column in {table.ref}")
            if not allowed.column_allowed(table.ref, name):
                raise InvalidOperation(f"{part}.{name}", f"column not allowed in {table.ref}")
            if not column.writable and part == "values":
                raise InvalidOperation(f"{part}.{name}", "generated column, cannot be written")
            if part == "key" and value is None:
                raise InvalidOperation(f"key.{name}", "must not be null")
    if op.action == "upsert":
        assert op.key is not None and op.values is not None
        both = sorted(set(op.key) & set(op.values))
        if both:
            raise InvalidOperation(f"values.{both[0]}", "already given in key")
        if not table.is_unique_key(frozenset(op.key)):
            raise InvalidOperation(
                "key", f"{sorted(op.key)} is not a primary or unique key of {table.ref}"
            )


def _statement(op: Operation, catalog: Catalog, caller: Caller) -> None:
    for name in ("table", "action", "values", "key"):
        if getattr(op, name) is not None:
            raise InvalidOperation(name, "give either table/action or sql, not both")
    if not caller.allow_sql:
        raise InvalidOperation("sql", f"caller {caller.name!r} may not send SQL")
    assert op.sql is not None
    # Every table the statement names must be in the caller's scope, not just its target.
    checked = sqlguard.check_statement(op.sql, op.params, catalog.allow, caller.tables)
    if checked.table not in catalog.tables:
        raise UnknownToCatalog("sql", f"table {checked.table} does not exist")
    if checked.action not in caller.actions:
        how = " (ON CONFLICT DO UPDATE)" if checked.action == "upsert" else ""
        raise InvalidOperation("sql", f"caller {caller.name!r} may not {checked.action}{how}")


def _table(name: str, catalog: Catalog, caller: Caller) -> Table:
    ref = catalog.allow.resolve(name)
    if ref is None:
        raise InvalidOperation("table", f"{name!r} is not an allowed table")
    table = catalog.tables.get(ref)
    if table is None:
        raise UnknownToCatalog("table", f"{ref} does not exist in the database")
    return table


def _scope(caller: Caller, table: TableRef, action: Action | str) -> None:
    if not caller.may_touch(table):
        raise InvalidOperation("table", f"caller {caller.name!r} may not touch {table}")
    if action not in caller.actions:
        raise InvalidOperation("action", f"caller {caller.name!r} may not {action}")


def _presence(field: str, given: dict[str, Any] | None, needed: bool, action: str) -> None:
    if needed and not given:
        raise InvalidOperation(field, f"required and non-empty for {action}")
    if not needed and given is not None:
        raise InvalidOperation(field, f"not used by {action}")


def scope(caller: Caller | None) -> tuple[str | None, str | None]:
    """(owner, looker): whose operations ``caller`` may see (None: everyone's), and whose
    come first when several match."""
    owner = None if caller is None or caller.admin else caller.name
    looker = caller.name if caller is not None else None
    return owner, looker


def lookup(op_id: str, caller: Caller | None) -> tuple[str | None, str | None] | None:
    """``scope(caller)`` for looking ``op_id`` up (an id or a userOperationId), or None
    when it is not a UUID: no operation has it, and PostgreSQL must not be asked."""
    try:
        uuid.UUID(op_id)
    except ValueError:
        return None
    return scope(caller)
