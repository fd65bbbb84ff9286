"""The store's pure parts and the memory store's list, which the actors' tests rely on."""

from __future__ import annotations

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
    assert decode_cursor(encode_cursor(stamp, op_id)) == (stamp, op_id)
    for forged in ("", "x", "bm90IGEgY3Vyc29y", encode_cursor(stamp, "not-a-uuid")):
        with pytest.raises(InvalidOperation) as refused:
            decode_cursor(forged)
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
