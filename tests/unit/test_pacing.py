"""Gathering (streamsvc.pacing): small cycles spaced out while work keeps coming, never
after a quiet moment; the flusher taking what gathered into one batch, and not gathering
again what an inbox reader gathered."""

from __future__ import annotations

import functools

import anyio
import fakeredis
import pytest

from streamsvc.actors.flusher import Flusher
from streamsvc.adapters import streams as rs
from streamsvc.model import WorkOp, outcomes_decoder
from streamsvc.pacing import Pacer
from streamsvc.policy import RetryPolicy
from streamsvc.store import NewOperation
from streamsvc.store.memory import MemoryStore
from tests.pipeline import eventually
from tests.unit.test_flusher import Rig, new

pytestmark = pytest.mark.anyio


async def at_least(seen: list[str], n: int) -> bool:
    return len(seen) >= n


async def reported(streams: rs.Streams, n: int) -> bool:
    """At least ``n`` outcomes are on the outcome stream."""
    entries = await streams.redis.xrange(streams.names.outcomes)
    return sum(len(outcomes_decoder.decode(fields[b"o"])) for _, fields in entries) >= n


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_cycle_after_a_quiet_moment_starts_at_once() -> None:
    clock = Clock()
    pacer = Pacer(10, clock=clock)
    assert pacer.wait_s() == 0, "the first cycle"
    pacer.started(full=False)
    clock.now += 0.011  # longer ago than gather
    assert pacer.wait_s() == 0


def test_a_cycle_close_behind_the_last_waits_for_the_rest_of_gather() -> None:
    clock = Clock()
    pacer = Pacer(10, clock=clock)
    pacer.started(full=False)
    clock.now += 0.003
    assert pacer.wait_s() == pytest.approx(0.007)


def test_a_cycle_behind_a_full_one_does_not_wait() -> None:
    clock = Clock()
    pacer = Pacer(10, clock=clock)
    pacer.started(full=True)  # a backlog: the next goes at once
    clock.now += 0.001
    assert pacer.wait_s() == 0


def test_without_gathering_no_cycle_waits_and_actors_take_no_turns() -> None:
    clock = Clock()
    pacer = Pacer(0, clock=clock)
    pacer.started(full=False)
    assert pacer.wait_s() == 0
    assert not pacer._turn.locked()


async def test_one_actor_at_a_time_takes_a_turn_when_gathering() -> None:
    pacer = Pacer(50)
    inside: list[int] = []
    most = 0

    async def actor(n: int) -> None:
        nonlocal most
        async with pacer.turn():
            inside.append(n)
            most = max(most, len(inside))
            await anyio.sleep(0.01)
            inside.remove(n)

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(actor, n)
    assert most == 1


async def test_the_flusher_applies_work_that_trickles_in_within_gather_as_one_batch() -> None:
    rig = Rig()
    rig.flusher.pacer = Pacer(300)
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.flusher.run)
        await rig.submit([new(0)])  # after a quiet moment: applied at once, alone
        await eventually(lambda: at_least(rig.store.applied, 1), within=2, every=0.005)
        for n in range(1, 4):  # three entries, 30 ms apart, close behind it
            await rig.submit([new(n)])
            await anyio.sleep(0.03)
        await eventually(lambda: reported(rig.streams, 4), within=5, every=0.005)
        rig.flusher.stopping = True
        tg.cancel_scope.cancel()
    batches = {o.batch_id for o in await rig.outcomes() if o.id != "op-0"}
    assert len(batches) == 1, f"one batch for the three that trickled in, not {batches}"
    assert rig.store.applied == [f"op-{n}" for n in range(4)]


async def test_flushers_sharing_a_pacer_space_their_small_batches_apart() -> None:
    store = MemoryStore()
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    pacer = Pacer(200)
    retry = RetryPolicy(max_attempts=3, base_ms=1, cap_ms=2)
    flushers = [Flusher(f"f{n}", store, streams, retry, limit=100, pacer=pacer) for n in range(2)]
    async with anyio.create_task_group() as tg:
        for flusher in flushers:
            tg.start_soon(flusher.run)
        for n in range(6):  # one entry each 20 ms: about two batches in 120 ms, not six
            stored = await store.intake([NewOperation(f"op-{n}", new(n).op, "api", "c", None)])
            await streams.add_each(rs.work_entries(streams.names, stored.ready, 100))
            await anyio.sleep(0.02)
        await eventually(lambda: reported(streams, 6), within=5, every=0.005)
        for flusher in flushers:
            flusher.stopping = True
        tg.cancel_scope.cancel()
    entries = await streams.redis.xrange(streams.names.outcomes)
    assert len(entries) <= 3, f"{len(entries)} batches for six entries 20 ms apart"


async def test_the_flusher_takes_work_that_gathered_on_its_way_in_at_once() -> None:
    """Entries an inbox reader already gathered (marked ``GATHERED``) are not held back
    again: three such entries 30 ms apart are three batches, each at once."""
    rig = Rig()
    rig.flusher.pacer = Pacer(300)
    streams = rig.streams
    added: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.flusher.run)
        for n in range(4):
            stored = await rig.store.intake(
                [NewOperation(f"op-{n}", new(n).op, "inbox", "c", None)]
            )
            await streams.add_each(streams.spread(stored.ready, 100, gathered=True))
            added[f"op-{n}"] = anyio.current_time()
            await eventually(
                functools.partial(at_least, rig.store.applied, n + 1), within=2, every=0.005
            )
            assert anyio.current_time() - added[f"op-{n}"] < 0.15, f"op-{n} was held back"
            await anyio.sleep(0.03)
        rig.flusher.stopping = True
        tg.cancel_scope.cancel()
    assert len({o.batch_id for o in await rig.outcomes()}) == 4


async def test_work_entries_are_marked_gathered_only_when_they_were() -> None:
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    ops = [WorkOp(f"op-{n}", new(n).op) for n in range(3)]
    await streams.add_each(streams.spread(ops, 100, gathered=True))
    await streams.add_each(streams.spread(ops, 100))
    await streams.add_each(rs.work_entries(streams.names, ops, 100))
    read = [fields for _, fields in await streams.redis.xrange(streams.names.work)]
    assert [rs.gathered(fields) for fields in read] == [True, False, False]
    assert [rs.operations_in(fields) for fields in read] == [3, 3, 3]
