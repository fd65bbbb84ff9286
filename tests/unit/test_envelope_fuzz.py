"""Property: whatever bytes reach a door, decoding and validating them either gives an
operation every store can take, or refuses it naming a field. Nothing else escapes."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsvc.errors import InvalidOperation
from streamsvc.model import (
    MAX_LABEL_BYTES,
    Operation,
    decode_operation,
    decode_operations,
    json_encoder,
)
from streamsvc.validate import ANONYMOUS, validate
from tests.unit.fixtures import catalog

CATALOG = catalog()

# Strings hostile to PostgreSQL, Redis and AMQP, mixed with ordinary ones.
hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "a\x00b", "é" * 130, "\n", "\x7f", "\u2028", "id", "note"]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=300),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=20,
)


@st.composite
def deep_json(draw: st.DrawFn) -> Any:
    value: Any = draw(scalars)
    for _ in range(draw(st.integers(min_value=0, max_value=80))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


times = st.one_of(
    st.datetimes(
        min_value=dt.datetime(1, 1, 2),
        max_value=dt.datetime(9999, 12, 30),
        timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-14))]) | st.none(),
    ).map(dt.datetime.isoformat),
    hostile_text,
)
columns = st.dictionaries(
    st.sampled_from(["id", "customer", "amount", "note", "total", "nope"]) | hostile_text,
    json_values,
    max_size=4,
)
# Valid but for what a field holds: most of these reach the stores when the door lets them.
near_valid = st.fixed_dictionaries(
    {
        "operationType": hostile_text | st.just("ORDER_CREATED"),
        "table": st.just("orders"),
        "action": st.just("insert"),
        "values": st.fixed_dictionaries(
            {"id": st.integers(min_value=1, max_value=2**31 - 1), "customer": hostile_text},
            optional={"note": hostile_text | json_values},
        ),
    },
    optional={
        "userOperationId": st.uuids().map(str),
        "priority": st.integers(min_value=0, max_value=9),
        "runAt": times,
        "delayMs": st.integers(min_value=0, max_value=2**40),
        "orderingKey": hostile_text,
        "meta": json_values | deep_json(),
    },
) | st.fixed_dictionaries(
    {
        "operationType": hostile_text,
        "sql": st.just("UPDATE orders SET note = $1 WHERE id = $2"),
        "params": st.tuples(hostile_text, st.integers(min_value=1, max_value=9)).map(list),
    }
)
random_envelopes = st.fixed_dictionaries(
    {"operationType": hostile_text},
    optional={
        "userOperationId": st.uuids().map(str) | hostile_text,
        "table": st.sampled_from(["orders", "public.orders", "limited", "nope"]) | hostile_text,
        "action": st.sampled_from(["insert", "upsert", "update", "delete"]) | hostile_text,
        "values": columns,
        "key": columns,
        "sql": st.sampled_from(
            [
                "UPDATE orders SET note = $1 WHERE id = $2",
                "INSERT INTO orders (id, customer, amount) VALUES ($1, $2, $3)",
                "DELETE FROM orders WHERE note = 'a\x00'",
                "DROP TABLE orders",
            ]
        ),
        "params": st.lists(json_values, max_size=4),
        "priority": st.integers(min_value=-3, max_value=12),
        "runAt": times,
        "delayMs": st.integers(min_value=-1, max_value=2**70),
        "orderingKey": hostile_text,
        "meta": json_values | deep_json(),
        "apiKey": hostile_text,
        "extra": json_values,
    },
)
envelopes = near_valid | random_envelopes


def door(raw: bytes) -> Operation | InvalidOperation:
    """What every door does with a body: decode (nesting first), then validate."""
    try:
        op = decode_operation(raw)
        validate(op, CATALOG, ANONYMOUS)
    except InvalidOperation as refused:
        return refused
    return op


def assert_storable(op: Operation) -> None:
    """What PostgreSQL (text, jsonb, timestamptz), Redis and AMQP need of an accepted one."""
    body = json_encoder.encode(op)
    assert b"\\u0000" not in body
    assert msgspec.json.decode(body, type=Operation) == op
    for label in (op.operation_type, op.ordering_key or ""):
        assert len(label.encode()) <= MAX_LABEL_BYTES
        assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in label)
    if op.run_at is not None:
        assert dt.datetime(2000, 1, 1, tzinfo=dt.UTC) <= op.run_at.replace(
            tzinfo=op.run_at.tzinfo or dt.UTC
        )
    if op.delay_ms is not None:
        assert dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=op.delay_ms)


def assert_door_holds(raw: bytes) -> None:
    result = door(raw)
    if isinstance(result, InvalidOperation):
        assert result.field and result.reason
    else:
        assert_storable(result)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.booleans())
def test_any_operation_shaped_json_is_accepted_storable_or_refused_by_field(
    envelope: dict[str, Any], ascii_only: bool
) -> None:
    assert_door_holds(json.dumps(envelope, ensure_ascii=ascii_only).encode())


@settings(max_examples=300)
@given(json_values | deep_json())
def test_any_json_is_accepted_storable_or_refused_by_field(value: Any) -> None:
    assert_door_holds(json.dumps(value).encode())


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_are_accepted_storable_or_refused_by_field(raw: bytes) -> None:
    assert_door_holds(raw)


@settings(max_examples=200)
@given(envelopes, st.integers(min_value=0), st.binary(min_size=1, max_size=8))
def test_corrupted_operations_are_refused_by_field(
    envelope: dict[str, Any], at: int, noise: bytes
) -> None:
    raw = json.dumps(envelope).encode()
    cut = at % (len(raw) + 1)
    assert_door_holds(raw[:cut] + noise + raw[cut:])


@settings(max_examples=100)
@given(st.lists(envelopes, max_size=4) | json_values)
def test_any_bulk_body_decodes_or_is_refused_by_field(value: Any) -> None:
    try:
        decode_operations(json.dumps(value).encode())
    except InvalidOperation as refused:
        assert refused.field and refused.reason
