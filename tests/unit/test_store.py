"""The store's pure parts and the memory store's list, which the actors' tests rely on."""

from __future__ import annotations

import base64
import datetime as dt
import uuid

import msgspec
import pytest

from streamsvc.errors import InvalidOperation
from streamsvc.model import ListQuery, Operation, Status
from streamsvc.store import NewOperation
from streamsvc.store.memory import MemoryStore
from streamsvc.store.queries import load
from streamsvc.store.records import decode_cursor, encode_cursor

pytestmark = pytest.mark.anyio


def test_a_cursor_round_trips_and_a_forged_one_is_refused_naming_the_cursor() -> None:
    stamp, op_id = dt.datetime(2026, 11, 30, 12, 0, 1, 5, dt.UTC), str(uuid.uuid4())
    assert decode_cursor(encode_cursor(stamp, op_id, "a"), "a") == (stamp, op_id)
    assert decode_cursor(encode_cursor(stamp, op_id, None), None) == (stamp, op_id)
    wrong_shape = [f"{stamp.isoformat()}|{op_id}", f"{stamp.replace(tzinfo=None)}|{op_id}|x"]
    for forged in (
        "",
        "x",
        "bm90IGEgY3Vyc29y",
        "%%%%",
        encode_cursor(stamp, "not-a-uuid", "a"),
        *(base64.urlsafe_b64encode(text.encode()).decode() for text in wrong_shape),
        base64.urlsafe_b64encode(b"0001-01-01T00:00:00+05:00|" + op_id.encode() + b"|x").decode(),
    ):
        with pytest.raises(InvalidOperation) as refused:
            decode_cursor(forged, "a")
        assert refused.value.field == "cursor", forged


@pytest.mark.parametrize(("given", "used_by"), [("a", "b"), ("a", None), (None, "a")])
def test_a_cursor_of_another_callers_list_is_refused(
    given: str | None, used_by: str | None
) -> None:
    cursor = encode_cursor(dt.datetime.now(dt.UTC), str(uuid.uuid4()), given)
    with pytest.raises(InvalidOperation, match="another caller's list") as refused:
        decode_cursor(cursor, used_by)
    assert refused.value.field == "cursor"


def test_named_queries_are_read_without_their_comments_and_each_name_once() -> None:
    text = "-- name: one\n-- what it does\nSELECT 1\n\n-- name: two\nSELECT 2\n"
    assert load(text) == {"one": "SELECT 1", "two": "SELECT 2"}
    with pytest.raises(ValueError, match="twice"):
        load(text + "-- name: one\nSELECT 3\n")


async def test_the_memory_stores_list_pages_newest_first_by_owner_and_status() -> None:
    clock = [dt.datetime(2026, 11, 30, tzinfo=dt.UTC)]
    store = MemoryStore(now=lambda: clock[0])
    op = msgspec.convert({"operationType": "T", "sql": "DELETE FROM t"}, Operation)
    ids = []
    for n in range(5):
        clock[0] += dt.timedelta(seconds=1)
        op_id = str(uuid.uuid4())
        ids.append(op_id)
        await store.intake([NewOperation(op_id, op, "api", "a" if n != 2 else "b")])
    mine = [i for n, i in enumerate(ids) if n != 2][::-1]
    first = await store.list_operations(ListQuery(limit=2), owner="a")
    assert [v.id for v in first.items] == mine[:2] and first.next_cursor is not None
    rest = await store.list_operations(ListQuery(cursor=first.next_cursor), owner="a")
    assert [v.id for v in rest.items] == mine[2:] and rest.next_cursor is None
    none = await store.list_operations(ListQuery(status=Status.SUCCESS), owner=None)
    assert none.items == []


async def test_the_memory_store_counts_a_window_by_status_and_type_for_an_owner() -> None:
    clock = [dt.datetime(2026, 11, 30, tzinfo=dt.UTC)]
    store = MemoryStore(now=lambda: clock[0])
    for n, (owner, op_type) in enumerate([("a", "T"), ("a", "U"), ("b", "T"), ("a", "T")]):
        clock[0] += dt.timedelta(minutes=1)
        op = msgspec.convert({"operationType": op_type, "sql": "DELETE FROM t"}, Operation)
        await store.intake([NewOperation(str(uuid.uuid4()), op, "api", owner)])
        if n == 0:
            await store.apply([r.op for r in store.rows.values()])
    start = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    counts = await store.counts(start, clock[0], owner="a")  # the last is at until: left out
    assert counts.by_status == {
        "UNPROCESSED": 1, "PROCESSING": 0, "SUCCESS": 1, "FAIL": 0, "CANCELLED": 0
    }  # fmt: skip
    assert counts.by_type == {"T": {"SUCCESS": 1}, "U": {"UNPROCESSED": 1}}
    everyone = await store.counts(start, clock[0] + dt.timedelta(seconds=1), owner=None)
    assert everyone.by_type == {"T": {"SUCCESS": 1, "UNPROCESSED": 2}, "U": {"UNPROCESSED": 1}}


async def test_the_memory_stores_throughput_is_per_minute_oldest_first_zeros_included() -> None:
    clock = [dt.datetime(2026, 11, 30, 12, 0, 30, tzinfo=dt.UTC)]
    store = MemoryStore(now=lambda: clock[0])
    op = msgspec.convert({"operationType": "T", "sql": "DELETE FROM t"}, Operation)
    await store.intake([NewOperation(str(uuid.uuid4()), op, "api", "a") for _ in range(3)])
    await store.apply([r.op for r in store.rows.values()])
    clock[0] += dt.timedelta(minutes=2)
    minutes = await store.throughput(3)
    assert [(m.start.minute, m.finished) for m in minutes] == [(0, 3), (1, 0), (2, 0)]
