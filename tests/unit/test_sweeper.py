"""The sweeper's re-enqueueing over the in-memory store and fakeredis: no servers.

Rows are stored on a store clock set in the past, so they are older than the sweep horizon
(``interval_ms`` before the oldest entry in the work streams, or before now)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import fakeredis
import msgspec
import pytest

from streamsvc.actors.flusher import Flusher
from streamsvc.actors.sweeper import Sweeper
from streamsvc.adapters import streams as rs
from streamsvc.model import Operation, Status, outcomes_decoder, work_decoder
from streamsvc.policy import RetryPolicy
from streamsvc.store import NewOperation
from streamsvc.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

INTERVAL_MS = 1000


def new(n: int, run_at: dt.datetime | None = None, **fields: object) -> NewOperation:
    raw = {"operationType": "T", "table": "orders", "action": "insert", "values": {"id": n}}
    return NewOperation(
        f"op-{n}", msgspec.convert({**raw, **fields}, Operation), "api", "c", run_at
    )


class Rig:
    """A memory store whose rows were stored ``age`` ago (by its clock), fake streams, a
    sweeper and a flusher."""

    def __init__(self, age: dt.timedelta = dt.timedelta(minutes=1)) -> None:
        self.now = dt.datetime.now(dt.UTC) - age
        self.store = MemoryStore(now=lambda: self.now)
        self.streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
        self.sweeper = Sweeper(
            "s",
            self.store,
            self.streams,
            interval_ms=INTERVAL_MS,
            claim_idle_ms=1000,
            max_deliveries=3,
            chunk=100,
        )
        retry = RetryPolicy(max_attempts=3, base_ms=1, cap_ms=2)
        self.flusher = Flusher("f", self.store, self.streams, retry, limit=100)

    async def submit(self, rows: Sequence[NewOperation]) -> None:
        """As the ingress does: store, then put what is ready on the work streams."""
        stored = await self.store.intake(rows)
        await self.streams.add_each(rs.work_entries(self.streams.names, stored.ready, 100))

    async def queued(self) -> list[str]:
        """The ids on every work stream, highest band first."""
        ids: list[str] = []
        for stream in self.streams.names.work_streams:
            for _, fields in await self.streams.redis.xrange(stream):
                ids.extend(w.id for w in work_decoder.decode(fields[b"ops"]))
        return ids

    def status(self, op_id: str) -> Status:
        return self.store.rows[op_id].status


async def test_rows_are_reenqueued_after_redis_lost_the_streams() -> None:
    rig = Rig()
    await rig.submit([new(n, priority=n % 3) for n in range(6)])
    await rig.streams.redis.flushall()
    assert await rig.queued() == []
    report = await rig.sweeper.sweep()
    assert report.reenqueued_rows == 6
    assert sorted(await rig.queued()) == [f"op-{n}" for n in range(6)]
    await rig.flusher.run(burst=True)
    assert sorted(rig.store.applied) == [f"op-{n}" for n in range(6)]
    assert (await rig.sweeper.sweep()).reenqueued_rows == 0, "nothing left to re-enqueue"


async def test_rows_still_on_a_stream_are_not_reenqueued() -> None:
    rig = Rig(age=dt.timedelta(0))  # stored and put on its stream just now
    await rig.submit([new(1)])
    assert (await rig.sweeper.sweep()).reenqueued_rows == 0
    assert await rig.queued() == ["op-1"]


async def test_held_and_parked_rows_are_not_reenqueued() -> None:
    rig = Rig()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await rig.submit(
        [
            new(1, later),  # held for its runAt
            new(2, orderingKey="k"),  # the key's head: on a stream
            new(3, orderingKey="k"),  # parked behind it
            new(4, later, orderingKey="j"),  # a key's head held for its runAt: holds the key
            new(5, orderingKey="j"),
        ]
    )
    assert await rig.queued() == ["op-2"]
    await rig.streams.redis.flushall()
    report = await rig.sweeper.sweep()
    assert (report.reenqueued_rows, report.released_keys) == (1, 0)
    assert await rig.queued() == ["op-2"]
    assert rig.store.rows["op-1"].wake_at == later and rig.store.rows["op-4"].wake_at == later
    assert rig.store.rows["op-3"].parked and rig.store.rows["op-5"].parked


async def test_a_key_whose_head_is_left_parked_is_released_by_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    await rig.submit([new(n, orderingKey="k") for n in (1, 2, 3)])
    with monkeypatch.context() as lost:  # the cancel commits; its release never happens
        lost.setattr(rig.store, "_release", lambda keys: [])
        cancelled = await rig.store.cancel("op-1", owner=None, looker=None)
    assert cancelled.verdict == "cancelled" and cancelled.released == []
    assert rig.store.rows["op-2"].parked, "the key's head is parked: nobody will release it"
    report = await rig.sweeper.sweep()
    assert report.released_keys == 1
    assert "op-2" in await rig.queued()
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-2", "op-3"]
    assert rig.status("op-1") is Status.CANCELLED
    assert (await rig.sweeper.sweep()).released_keys == 0


async def outcome_ids(rig: Rig) -> list[str]:
    """The ids of every outcome on the outcome stream."""
    ids: list[str] = []
    for _, fields in await rig.streams.redis.xrange(rig.streams.names.outcomes):
        ids += [o.id for o in outcomes_decoder.decode(fields[b"o"])]
    return ids


async def test_outcomes_redis_lost_before_they_were_relayed_are_put_back() -> None:
    rig = Rig(age=dt.timedelta(0))
    await rig.submit([new(n) for n in range(3)])
    await rig.flusher.run(burst=True)  # applied; their outcomes wait on the outcome stream
    assert (await rig.sweeper.sweep()).reannounced == 0  # a new Redis: nothing known yet
    await rig.sweeper.sweep()  # the point: before the oldest outcome not yet relayed
    marked = rig.store.point
    assert marked is not None and marked.before <= rig.now + dt.timedelta(milliseconds=INTERVAL_MS)
    await rig.streams.redis.flushall()
    report = await rig.sweeper.sweep()
    assert report.reannounced == 3
    assert sorted(await outcome_ids(rig)) == ["op-0", "op-1", "op-2"]
    assert (await rig.sweeper.sweep()).reannounced == 0, "once per loss"


async def test_outcomes_relayed_long_before_the_loss_are_not_announced_again() -> None:
    rig = Rig(age=dt.timedelta(minutes=10))  # finished ten minutes ago
    await rig.submit([new(1)])
    await rig.flusher.run(burst=True)
    await rig.streams.redis.delete(rig.streams.names.outcomes)  # relayed (acked, deleted)
    await rig.sweeper.sweep()
    await rig.sweeper.sweep()  # the point: now, less the interval
    await rig.streams.redis.flushall()
    assert (await rig.sweeper.sweep()).reannounced == 0
    assert await outcome_ids(rig) == []


async def test_a_redis_restarted_empty_lost_nothing_that_finished_after_it_started() -> None:
    """Outcomes written to the Redis that came back are there: only what finished before
    it started again (and the interval after) is announced again."""
    rig = Rig(age=dt.timedelta(0))
    await rig.sweeper.sweep()  # names the data
    await rig.submit([new(1)])
    await rig.flusher.run(burst=True)
    await rig.sweeper.sweep()  # the point: before op-1's outcome
    await rig.streams.redis.flushall()
    restarted = rig.now + dt.timedelta(seconds=5)
    rig.now = restarted + dt.timedelta(seconds=30)  # op-2 finishes well after the restart
    await rig.submit([new(2)])
    await rig.flusher.run(burst=True)
    await rig.streams.redis.delete(rig.streams.names.outcomes)  # op-2's was relayed

    async def started_ms(key: str) -> int:
        return round(restarted.timestamp() * 1000)

    rig.streams.started_ms = started_ms  # type: ignore[method-assign]
    assert (await rig.sweeper.sweep()).reannounced == 1
    assert await outcome_ids(rig) == ["op-1"]
