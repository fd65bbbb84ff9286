"""The scheduler over the in-memory store and fakeredis: no servers.

The store's clock is a ``Clock`` the tests move; the scheduler waits by the real monotonic
clock for the seconds the store says are left, so "not before" is measured in real time."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import fakeredis
import msgspec
import pytest
import redis.exceptions

from streamsvc.actors.scheduler import Scheduler
from streamsvc.actors.sweeper import Sweeper
from streamsvc.adapters import streams as rs
from streamsvc.model import Operation, Receipt, Rejection, Status, work_decoder
from streamsvc.schedules import Schedule, latest_tick, parse_schedules, tick_id
from streamsvc.store import NewOperation
from streamsvc.store.memory import MemoryStore
from tests.pipeline import eventually

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
OP = {"operationType": "T", "table": "orders", "action": "insert", "values": {"id": 1}}
YEARLY = "0 0 0 1 1 *"  # seconds first: 1 January, 00:00:00


class Clock:
    """The store's clock, moved by hand."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def held(n: int, run_at: dt.datetime, **fields: object) -> NewOperation:
    op = msgspec.convert({**OP, "values": {"id": n}, **fields}, Operation)
    return NewOperation(f"op-{n}", op, "api", "caller", run_at)


def schedule(name: str, cron: str) -> Schedule:
    text = msgspec.json.encode({name: {"cron": cron, "operation": OP}}).decode()
    return parse_schedules(text)[name]


class Rig:
    """A memory store on a clock of its own and fake streams."""

    def __init__(self, now: dt.datetime = T0) -> None:
        self.clock = Clock(now)
        self.store = MemoryStore(now=self.clock)
        self.streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
        self.looks = 0
        self.submitted: list[tuple[str, dt.datetime]] = []  # (scheduler, tick)
        due = self.store.due

        async def counted(within_s: float, limit: int) -> Any:
            self.looks += 1
            return await due(within_s, limit)

        self.store.due = counted  # type: ignore[method-assign]

    def scheduler(
        self, name: str = "a", *, lookahead_ms: int = 1000, schedules: Sequence[Schedule] = ()
    ) -> Scheduler:
        async def submit(op: Operation) -> Receipt | Rejection:
            """As the ingress does for the schedules' caller: the id is the tick's own."""
            assert op.user_operation_id is not None and op.run_at is not None
            self.submitted.append((name, op.run_at))
            op_id = str(op.user_operation_id)
            stored = await self.store.intake(
                [NewOperation(op_id, op, "schedule", "streamsvc:schedules", op.run_at)]
            )
            return Receipt(op_id, op.operation_type, Status.UNPROCESSED, op_id in stored.created)

        return Scheduler(
            self.store,
            self.streams,
            chunk=100,
            poll_ms=10,
            lookahead_ms=lookahead_ms,
            schedules=schedules,
            submit=submit,
        )

    async def on_stream(self, priority: int) -> list[str]:
        entries = await self.streams.redis.xrange(self.streams.names.work_of(priority))
        return [w.id for _, fields in entries for w in work_decoder.decode(fields[b"ops"])]

    async def looked(self, times: int) -> None:
        """Wait until the schedulers looked for due operations ``times`` more times."""
        until = self.looks + times

        async def enough() -> bool:
            return self.looks >= until

        await eventually(enough, within=5, every=0.005)


@asynccontextmanager
async def scheduling(*schedulers: Scheduler) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for scheduler in schedulers:
            tg.start_soon(scheduler.run)
        try:
            yield
        finally:
            for scheduler in schedulers:
                scheduler.stop()


# -- held operations ---------------------------------------------------------------------


async def test_a_held_operation_goes_on_its_priority_band_only_when_due() -> None:
    rig = Rig()
    await rig.store.intake([held(1, T0 + dt.timedelta(seconds=60), priority=7)])
    async with scheduling(rig.scheduler(lookahead_ms=1000)):
        await rig.looked(3)
        assert rig.store.rows["op-1"].wake_at is not None, "not taken a minute ahead"
        assert await rig.on_stream(7) == []
        rig.clock.now = T0 + dt.timedelta(seconds=59.7)  # within the look-ahead: 0.3 s left
        moved = time.monotonic()

        async def on_band() -> bool:
            return await rig.on_stream(7) == ["op-1"]

        await eventually(on_band, within=5, every=0.005)
        waited = time.monotonic() - moved
    assert waited >= 0.3, f"put on its stream {0.3 - waited:.3f} s early"
    for priority in range(7):
        assert await rig.on_stream(priority) == []


async def test_a_redis_refusing_writes_costs_the_scheduler_nothing_but_a_late_operation() -> None:
    """Redis refusing the XADD (out of memory, say) is logged; the scheduler goes on, and the
    operation, pending and on no stream, is the sweeper's to re-enqueue."""
    rig = Rig()
    await rig.store.intake([held(1, T0), held(2, T0 + dt.timedelta(seconds=0.2))])
    rig.clock.now = T0 + dt.timedelta(seconds=1)
    add_each = rig.streams.add_each
    refusals = 0

    async def refusing_once(entries: Any) -> None:
        nonlocal refusals
        if refusals == 0:
            refusals += 1
            raise redis.exceptions.ResponseError("OOM command not allowed")
        await add_each(entries)

    rig.streams.add_each = refusing_once  # type: ignore[method-assign]
    async with scheduling(rig.scheduler()):
        await rig.looked(3)
    assert refusals == 1
    row = rig.store.rows["op-1"]
    assert row.pending and row.wake_at is None, "taken, on no stream: the sweeper's now"
    assert await rig.store.stale(T0 + dt.timedelta(seconds=2), 10) != []


async def test_an_operation_due_now_goes_on_its_stream_at_the_next_look() -> None:
    rig = Rig()
    await rig.store.intake([held(1, T0 + dt.timedelta(seconds=5))])
    rig.clock.now = T0 + dt.timedelta(seconds=6)  # its runAt passed while nobody looked
    async with scheduling(rig.scheduler()):

        async def on_band() -> bool:
            return await rig.on_stream(0) == ["op-1"]

        await eventually(on_band, within=5, every=0.005)


async def test_a_stopping_scheduler_gives_back_what_it_held() -> None:
    rig = Rig()
    run_at = T0 + dt.timedelta(seconds=30)
    await rig.store.intake([held(1, run_at), held(2, run_at, priority=3)])
    scheduler = rig.scheduler(lookahead_ms=60_000)  # takes them at once, holds them 30 s
    async with scheduling(scheduler):

        async def taken() -> bool:
            return all(row.wake_at is None for row in rig.store.rows.values())

        await eventually(taken, within=5, every=0.005)
    assert [row.wake_at for row in rig.store.rows.values()] == [run_at, run_at]
    assert await rig.on_stream(0) == [] and await rig.on_stream(3) == []
    again = rig.scheduler(name="b", lookahead_ms=60_000)  # the next one takes them again
    async with scheduling(again):
        await eventually(taken, within=5, every=0.005)


async def test_a_dead_schedulers_operations_are_swept_only_after_the_sweep_horizon() -> None:
    now = dt.datetime.now(dt.UTC)
    rig = Rig(now - dt.timedelta(seconds=5))  # a scheduler took it 5 s ago, then died
    await rig.store.intake([held(1, rig.clock.now + dt.timedelta(seconds=0.5))])
    (taken,) = await rig.store.due(1.0, 100)  # and never put it on a stream, nor gave it back
    assert taken.work.id == "op-1"
    rig.clock.now = now

    def sweeper(interval_ms: int) -> Sweeper:
        return Sweeper(
            "s",
            rig.store,
            rig.streams,
            interval_ms=interval_ms,
            claim_idle_ms=1000,
            max_deliveries=3,
            chunk=100,
        )

    assert (await sweeper(60_000).sweep()).reenqueued_rows == 0, "within the horizon"
    assert await rig.store.stale(now - dt.timedelta(seconds=10), 100) == []
    assert (await sweeper(1_000).sweep()).reenqueued_rows == 1, "past the horizon"
    assert await rig.on_stream(0) == ["op-1"]
    assert (await sweeper(1_000).sweep()).reenqueued_rows == 0, "touched: not twice"


# -- recurring operations ----------------------------------------------------------------


async def test_two_schedulers_sharing_a_store_store_each_tick_once() -> None:
    rig = Rig(dt.datetime.now(dt.UTC))
    every_second = [schedule("beat", "*/1 * * * * *")]
    a = rig.scheduler("a", schedules=every_second)
    b = rig.scheduler("b", schedules=every_second)
    async with scheduling(a, b):

        async def both_submitted_two_ticks() -> bool:
            ticks = {tick for _, tick in rig.submitted}
            return sum({("a", t), ("b", t)} <= set(rig.submitted) for t in ticks) >= 2

        await eventually(both_submitted_two_ticks, within=10, every=0.01)
    ticks = sorted({tick for _, tick in rig.submitted})
    rows = sorted(rig.store.rows.values(), key=lambda r: r.run_at or T0)
    assert [r.run_at for r in rows] == ticks, "one stored operation per tick"
    assert [r.id for r in rows] == [tick_id("beat", t) for t in ticks]
    assert len(rig.submitted) > len(rows), "both submitted; the store kept one"


async def test_a_missed_tick_is_submitted_once_on_start() -> None:
    rig = Rig(dt.datetime.now(dt.UTC))
    yearly = schedule("yearly", YEARLY)
    now = dt.datetime.now(dt.UTC)
    latest = latest_tick(yearly, now)
    rig.store.ticks["yearly"] = latest.replace(year=latest.year - 3)  # three were missed
    async with scheduling(rig.scheduler(schedules=[yearly])):

        async def recorded() -> bool:
            return rig.store.ticks["yearly"] == latest

        await eventually(recorded, within=5, every=0.005)
        await rig.looked(3)
    assert rig.submitted == [("a", latest)], "the latest missed tick, once; not the others"
    assert [r.run_at for r in rig.store.rows.values()] == [latest]


async def test_a_schedule_never_recorded_submits_nothing_on_start() -> None:
    rig = Rig(dt.datetime.now(dt.UTC))
    new, old = schedule("new", YEARLY), schedule("old", YEARLY)
    latest = latest_tick(old, dt.datetime.now(dt.UTC))
    rig.store.ticks["old"] = latest - dt.timedelta(days=400)
    # "new" is decided first: once "old"'s missed tick is recorded, "new" had its turn
    async with scheduling(rig.scheduler(schedules=[new, old])):

        async def old_recorded() -> bool:
            return rig.store.ticks["old"] == latest

        await eventually(old_recorded, within=5, every=0.005)
    assert rig.submitted == [("a", latest)]
    assert "new" not in rig.store.ticks
    assert [r.id for r in rig.store.rows.values()] == [tick_id("old", latest)]


async def test_a_recorded_tick_only_moves_forward() -> None:
    store = MemoryStore()
    await store.record_tick("s", T0)
    await store.record_tick("s", T0 - dt.timedelta(minutes=1))  # a late, slower process
    assert await store.last_ticks() == {"s": T0}
    await store.record_tick("s", T0 + dt.timedelta(minutes=1))
    assert await store.last_ticks() == {"s": T0 + dt.timedelta(minutes=1)}
