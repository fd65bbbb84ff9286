import time
import uuid

import pytest

from streamsvc.errors import InvalidOperation
from streamsvc.model import MAX_DEPTH, decode_operation, decode_operations, derived_id, too_deep


@pytest.mark.parametrize("name", ["streamsvc:inbox:1700000000000-0", "x", "ü:42", ""])
def test_derived_ids_are_the_uuid5_of_their_name(name: str) -> None:
    namespace = uuid.uuid4()
    assert derived_id(namespace, name) == str(uuid.uuid5(namespace, name))


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("raw", "limit", "path"),
    [
        (b'{"meta": ' + nested(31) + b"}", 32, None),
        (b'{"meta": ' + nested(32) + b"}", 32, ["meta", *[0] * 31]),
        (b'{"a": 1, "b": {"c": [1, [2, {"d": []}]]}}', 4, ["b", "c", 1, 1]),
        (b'[{"x": 1}, {"x": 2}, {"meta": [[[]]]}]', 4, [2, "meta", 0, 0]),
        (b'{"k\\"ey": [[]]}', 2, ['k"ey', 0]),
        (b'{"brackets in a string": "[[[[[[[[[[{{{{{{{{{{"}', 1, None),
        (b'{"escaped quote": "\\"[[[[[[[[[[[[", "x": 1}', 1, None),
        (b"[[[[[[[[[[not json", 3, [0, 0, 0]),
        (b"]]]]]]]]]]]]{}{}{}", 2, None),  # malformed: left to the decoder
    ],
)
def test_too_deep_names_the_path_to_the_first_container_too_deep(
    raw: bytes, limit: int, path: list[str | int] | None
) -> None:
    assert too_deep(raw, limit) == path


def test_too_deep_is_iterative_and_stops_early_on_hostile_input() -> None:
    started = time.monotonic()
    assert too_deep(nested(1_000_000), MAX_DEPTH) == [0] * MAX_DEPTH
    assert too_deep(b"[" + b"[]," * 300_000 + b"[]]", MAX_DEPTH) is None
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"operationType": "T", "meta": ' + nested(2_000) + b"}", "meta"),
        (b'{"operationType": "T", "values": {"a": ' + nested(40) + b"}}", "values"),
        (b'{"operationType": "T", "meta": {"a": {"b": ' + nested(200_000), "meta"),
    ],
)
def test_decode_operation_refuses_deep_nesting_with_a_field_error(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidOperation) as info:
        decode_operation(raw)
    assert (info.value.field, info.value.reason) == (field, "nested deeper than 32 levels")


def test_decode_operations_names_the_index_too() -> None:
    ok = b'{"operationType": "T"}'
    deep = b'{"operationType": "T", "meta": ' + nested(MAX_DEPTH) + b"}"
    with pytest.raises(InvalidOperation) as info:
        decode_operations(b"[" + ok + b"," + ok + b"," + deep + b"]")
    assert info.value.field == "2.meta"
    just_fits = b'{"operationType": "T", "meta": ' + nested(MAX_DEPTH - 1) + b"}"
    assert decode_operations(b"[" + just_fits + b"]")[0].meta is not None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"operationType": "T", "delayMs": 99999999999999999999}', "delayMs"),
        (b'{"operationType": "T", "delayMs": 31622400001}', "delayMs"),
        (b'{"operationType": "' + "é".encode() * 256 + b'"}', "operationType"),
        (b"\xff\xfe", "body"),
        (b'{"operationType": "\\ud800"}', "body"),
    ],
)
def test_decode_operation_refuses_what_msgspec_refuses_as_a_field_error(
    raw: bytes, field: str
) -> None:
    with pytest.raises(InvalidOperation) as info:
        decode_operation(raw)
    assert info.value.field == field


@pytest.mark.timeout(10)  # quadratic scanning would take hours on these
@pytest.mark.parametrize(
    "raw",
    [
        b'"' + b'\\"' * 500_000 + b"[" * 40,  # an open string of escaped quotes
        b'{"a": "x\\\n' + b'\\"' * 500_000,  # an escaped newline, then the same
        b'["' + b"\\\\" * 500_000 + b'"' + b"[" * 40,  # a closed string of escapes
        b'"\\' * 300_000,  # open strings that end in a backslash
    ],
    ids=["open-quotes", "escaped-newline", "closed-escapes", "open-backslashes"],
)
def test_the_nesting_scan_is_linear_on_hostile_strings(raw: bytes) -> None:
    """A megabyte of escapes, as a caller may send before anything is decoded: the scan
    answers in well under a second (a scan restarted at every `\\"` would run for hours)."""
    for _ in range(3):
        found = too_deep(raw, 32)
    assert found is None or len(found) == 32
