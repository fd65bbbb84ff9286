"""Retention over the memory store and fakeredis: which rows go, in batches, and a busy
lock that ends the cycle instead of failing it. (Stream trims need Redis's own Lua:
tests/integration/test_stream_trim.py.)"""

from __future__ import annotations

import datetime as dt

import fakeredis
import msgspec
import pytest

from streamsvc.actors.retention import Retention
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import LockWait
from streamsvc.model import Operation, Status, WorkOp
from streamsvc.store.memory import MemoryStore, Row

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
OP = msgspec.convert({"operationType": "T", "sql": "DELETE FROM t"}, Operation)


class CountingStore(MemoryStore):
    """Counts ``expire`` calls; ``busy``: each raises LockWait."""

    def __init__(self, *, busy: bool = False) -> None:
        super().__init__(now=lambda: NOW)
        self.calls = 0
        self.busy = busy

    async def expire(self, older_than_s: float, limit: int) -> int:
        self.calls += 1
        if self.busy:
            raise LockWait("lock wait: canceling statement due to lock timeout")
        return await super().expire(older_than_s, limit)


def put(store: MemoryStore, name: str, status: Status, finished_days_ago: float | None) -> None:
    stamp = NOW - 30 * DAY
    row = Row(name, WorkOp(name, OP), "api", "c", stamp, stamp, status=status)
    if finished_days_ago is not None:
        row.processed_at = NOW - finished_days_ago * DAY
    store.rows[name] = row


def retention(store: MemoryStore, *, days: float, batch: int = 2) -> Retention:
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    return Retention(
        store, streams, older_than_s=days * 86_400, batch=batch, interval_ms=10, pause_s=0
    )


def fill(store: MemoryStore) -> None:
    for n, status in enumerate((Status.SUCCESS, Status.FAIL, Status.CANCELLED, Status.SUCCESS)):
        put(store, f"old-{n}", status, finished_days_ago=8 + n)
    put(store, "recent", Status.SUCCESS, finished_days_ago=6.9)
    put(store, "pending", Status.UNPROCESSED, None)
    put(store, "retrying", Status.PROCESSING, None)


async def test_finished_rows_past_the_window_go_in_batches_the_rest_stay() -> None:
    store = CountingStore()
    fill(store)
    report = await retention(store, days=7, batch=3).cycle()
    assert report.deleted_rows == 4
    assert store.calls == 2  # 3, then 1 (fewer than a batch: none left)
    assert sorted(store.rows) == ["pending", "recent", "retrying"]


async def test_oldest_finished_go_first() -> None:
    store = CountingStore()
    fill(store)
    assert await store.expire(7 * 86_400, 1) == 1
    assert "old-3" not in store.rows  # finished 11 days ago, the oldest


async def test_zero_days_keeps_every_row_and_asks_nothing() -> None:
    store = CountingStore()
    fill(store)
    assert (await retention(store, days=0).cycle()).deleted_rows == 0
    assert store.calls == 0
    assert len(store.rows) == 7


async def test_a_busy_lock_ends_the_cycle_quietly_for_the_next_one() -> None:
    store = CountingStore(busy=True)
    fill(store)
    report = await retention(store, days=7).cycle()
    assert (report.deleted_rows, store.calls, len(store.rows)) == (0, 1, 7)
    store.busy = False
    assert (await retention(store, days=7).cycle()).deleted_rows == 4
