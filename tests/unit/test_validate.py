import datetime as dt
from typing import Any

import msgspec
import pytest

from streamsvc.allowlist import TableRef
from streamsvc.errors import InvalidOperation
from streamsvc.model import BodyKind, Operation, decode_error, operation_decoder
from streamsvc.validate import ANONYMOUS, Caller, UnknownToCatalog, validate
from tests.unit.fixtures import catalog

CATALOG = catalog()


def op(**fields: Any) -> Operation:
    return msgspec.convert({"operationType": "T", **fields}, Operation)


@pytest.mark.parametrize(
    "fields",
    [
        {"table": "orders", "action": "insert", "values": {"id": 1, "customer": "a", "amount": 1}},
        {"table": "public.orders", "action": "update", "values": {"note": "x"}, "key": {"id": 1}},
        {"table": "orders", "action": "delete", "key": {"id": 1}},
        {"table": "counters", "action": "upsert", "values": {"value": 1}, "key": {"name": "a"}},
        {"table": "counters", "action": "upsert", "values": {"value": 1}, "key": {"code": "z"}},
        {"table": "limited", "action": "insert", "values": {"id": 1, "note": "n"}},
        {"sql": "UPDATE orders SET note = $1 WHERE id = $2", "params": ["x", 1]},
        {"sql": "INSERT INTO orders (id, customer, amount) VALUES (1, 'a', 2)"},
    ],
)
def test_acceptable_operations(fields: dict[str, Any]) -> None:
    validate(op(**fields), CATALOG, ANONYMOUS)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({}, "table", "required"),
        ({"table": "orders"}, "action", "required"),
        ({"table": "secrets", "action": "insert", "values": {"id": 1}}, "table", "not an allowed"),
        ({"table": "orders", "action": "insert"}, "values", "required"),
        ({"table": "orders", "action": "insert", "values": {}}, "values", "required"),
        (
            {"table": "orders", "action": "insert", "values": {"id": 1}, "key": {"id": 1}},
            "key",
            "not used by insert",
        ),
        ({"table": "orders", "action": "update", "values": {"note": "x"}}, "key", "required"),
        (
            {"table": "orders", "action": "delete", "key": {"id": None}},
            "key.id",
            "must not be null",
        ),
        (
            {"table": "orders", "action": "delete", "key": {"id": 1}, "values": {"a": 1}},
            "values",
            "not used by delete",
        ),
        (
            {"table": "orders", "action": "insert", "values": {"nope": 1}},
            "values.nope",
            "no such column",
        ),
        (
            {"table": "orders", "action": "insert", "values": {"total": 1}},
            "values.total",
            "generated",
        ),
        (
            {"table": "limited", "action": "insert", "values": {"id": 1, "secret": "s"}},
            "values.secret",
            "not allowed",
        ),
        (
            {"table": "counters", "action": "upsert", "values": {"code": "x"}, "key": {"value": 1}},
            "key",
            "not a primary or unique key",
        ),
        (
            {
                "table": "counters",
                "action": "upsert",
                "values": {"name": "x"},
                "key": {"name": "x"},
            },
            "values.name",
            "already given in key",
        ),
        (
            {
                "table": "orders",
                "action": "insert",
                "values": {"id": 1},
                "sql": "DELETE FROM orders",
            },
            "table",
            "not both",
        ),
        (
            {"table": "orders", "action": "insert", "values": {"id": 1}, "params": [1]},
            "params",
            "go with sql",
        ),
        ({"sql": "DROP TABLE orders"}, "sql", "DROP"),
        ({"sql": "DELETE FROM orders; COMMIT"}, "sql", "one statement"),
        ({"runAt": "2030-01-01T00:00:00Z", "delayMs": 5, "table": "orders"}, "delayMs", "not both"),
    ],
)
def test_refusals_name_the_field_and_reason(fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidOperation) as info:
        validate(op(**fields), CATALOG, ANONYMOUS)
    assert info.value.field == field
    assert words in info.value.reason


def test_unknown_column_asks_for_a_catalog_refresh() -> None:
    with pytest.raises(UnknownToCatalog):
        validate(op(table="orders", action="insert", values={"added_later": 1}), CATALOG, ANONYMOUS)


@pytest.mark.parametrize(
    ("caller", "fields", "field"),
    [
        (
            Caller("ro", actions=frozenset({"insert"})),
            {"table": "orders", "action": "delete", "key": {"id": 1}},
            "action",
        ),
        (
            Caller("pay", tables=frozenset({TableRef("public", "payments")})),
            {"table": "orders", "action": "delete", "key": {"id": 1}},
            "table",
        ),
        (Caller("nosql", allow_sql=False), {"sql": "DELETE FROM orders"}, "sql"),
    ],
)
def test_caller_scope(caller: Caller, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidOperation) as info:
        validate(op(**fields), CATALOG, caller)
    assert info.value.field == field
    assert caller.name in info.value.reason


ORDERS_INSERTER = Caller(
    "orders-svc", tables=frozenset({TableRef("public", "orders")}), actions=frozenset({"insert"})
)


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        (
            "INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = 'x'",
            "caller 'orders-svc' may not upsert (ON CONFLICT DO UPDATE)",
        ),
        (
            "INSERT INTO orders (id, note) SELECT id, order_id::text FROM payments",
            "table public.payments is outside the caller's scope",
        ),
        (
            "INSERT INTO orders (id) VALUES ((SELECT max(id) FROM payments))",
            "table public.payments is outside the caller's scope",
        ),
        ("INSERT INTO payments (id) VALUES (1)", "table public.payments is outside"),
        ("DELETE FROM orders WHERE id = 1", "caller 'orders-svc' may not delete"),
        ("UPDATE orders SET note = 'x'", "caller 'orders-svc' may not update"),
    ],
)
def test_sql_stays_inside_the_callers_scope(sql: str, words: str) -> None:
    with pytest.raises(InvalidOperation) as info:
        validate(op(sql=sql), CATALOG, ORDERS_INSERTER)
    assert info.value.field == "sql"
    assert words in info.value.reason


@pytest.mark.parametrize(
    ("caller", "sql"),
    [
        (ORDERS_INSERTER, "INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO NOTHING"),
        (
            Caller("up", tables=frozenset({TableRef("public", "orders")})),
            "INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = 'x'",
        ),
        (
            Caller(
                "two", tables=frozenset({TableRef("public", t) for t in ("orders", "payments")})
            ),
            "UPDATE orders SET amount = p.amount FROM payments p WHERE p.order_id = orders.id",
        ),
    ],
)
def test_sql_inside_the_callers_scope_is_accepted(caller: Caller, sql: str) -> None:
    validate(op(sql=sql), CATALOG, caller)


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (b'{"operationType": "X", "priority": 12}', "priority", "<= 9"),
        (b'{"operationType": "X", "vaules": {}}', "vaules", "unknown field"),
        (b'{"table": "orders"}', "operationType", "missing required field"),
        (b'{"operationType": ""}', "operationType", "length >= 1"),
        (b'{"operationType": "X", "userOperationId": "nope"}', "userOperationId", "UUID"),
        (b'{"operationType": "X", "runAt": "soon"}', "runAt", "datetime"),
        (b'{"operationType": "X", "action": "merge"}', "action", "invalid enum"),
        (b"not json", "body", "malformed"),
    ],
)
def test_decode_errors_name_the_field(raw: bytes, field: str, words: str) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)) as info:
        operation_decoder.decode(raw)
    rejection = decode_error(info.value)
    assert rejection.field == field
    assert words in rejection.reason


def test_body_kinds() -> None:
    assert op(table="orders").kind is BodyKind.STRUCTURED
    assert op(sql="DELETE FROM orders WHERE id = $1", params=[1]).kind is BodyKind.STATEMENT
    assert op(sql="DELETE FROM orders").kind is BodyKind.LEGACY


def deeply(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


INSERT = {"table": "orders", "action": "insert", "values": {"id": 1, "customer": "a"}}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"operationType": "é" * 123}, "operationType", "longer than 245 bytes"),
        ({"operationType": "A\nB"}, "operationType", "control character"),
        ({"operationType": "A\x00"}, "operationType", "control character"),
        ({"operationType": "A\x85"}, "operationType", "control character"),
        ({"orderingKey": "k\x00"}, "orderingKey", "control character"),
        ({"orderingKey": "ü" * 128}, "orderingKey", "longer than 255 bytes"),
        ({"values": {"id": 1, "customer": "a\x00"}}, "values.customer", "NUL"),
        ({"values": {"id": 1, "cust\x00omer": "a"}}, "values", "NUL character in a key"),
        ({"meta": {"a": [{"b": "\x00"}]}}, "meta.a", "NUL"),
        ({"meta": {"a\x00": 1}}, "meta", "NUL character in a key"),
        ({"meta": deeply(32)}, "meta", "nested deeper than 32 levels"),
        ({"table": "orders\x00"}, "table", "NUL"),
        ({"runAt": "9999-12-31T23:59:59Z"}, "runAt", "between 2000-01-01 and a year from now"),
        ({"runAt": "1970-01-01T00:00:00"}, "runAt", "between"),
        ({"runAt": "0001-01-01T00:00:00+14:00"}, "runAt", "between"),
    ],
)
def test_what_the_stores_cannot_take_is_refused_at_the_door(
    fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidOperation) as info:
        validate(op(**{**INSERT, **fields}), CATALOG, ANONYMOUS)
    assert info.value.field == field
    assert words in info.value.reason


@pytest.mark.parametrize(
    "fields",
    [
        {"sql": "UPDATE orders SET note = $1 WHERE id = $2", "params": ["a\x00", 1]},
        {"sql": "DELETE FROM orders WHERE note = 'a\x00'"},
    ],
)
def test_nul_in_statements_and_their_params_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidOperation) as info:
        validate(op(**fields), CATALOG, ANONYMOUS)
    assert "NUL" in info.value.reason
    assert info.value.field in ("sql", "params.0")


def test_labels_and_times_at_their_bounds_are_accepted() -> None:
    now = dt.datetime.now(dt.UTC)
    validate(
        op(
            **INSERT,
            operationType="é" * 122 + "x",  # 245 bytes: <type>.CANCELLED is 255
            orderingKey="k" * 255,
            runAt=(now + dt.timedelta(days=365)).isoformat(),
            meta=deeply(31),
        ),
        CATALOG,
        ANONYMOUS,
    )
    validate(op(**INSERT, runAt="2000-01-01T00:00:00Z", delayMs=None), CATALOG, ANONYMOUS)
