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
from tests.envelopes import deep_json, envelopes, json_values
from tests.unit.fixtures import catalog

CATALOG = catalog()


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
