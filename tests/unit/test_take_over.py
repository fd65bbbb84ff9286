"""Take-over of a dead process's work (Sweeper.take_over, actors.heartbeat) over the memory
store and fakeredis: a consumer whose process's heartbeat expired loses its entries at once,
a live one keeps them however long it holds them."""

from __future__ import annotations

import anyio
import pytest

from streamsvc.actors.heartbeat import Heartbeat
from streamsvc.adapters import streams as rs
from tests.unit.test_sweeper import Rig, new

pytestmark = pytest.mark.anyio

DEAD, LIVE = "host-1-aaaaaa", "host-2-bbbbbb"


async def take(rig: Rig, consumer: str) -> list[bytes]:
    """What a flusher of that name would read: every new entry of the priority-0 stream."""
    read = await rig.streams.redis.xreadgroup(
        rs.FLUSHER_GROUP, consumer, {rig.streams.names.work: ">"}, count=1
    )
    return [entry_id for _, entries in read for entry_id, _ in entries]


async def test_a_dead_process_s_entries_are_taken_over_and_its_consumer_dropped() -> None:
    rig = Rig()
    rig.sweeper.heartbeat_ms = 5  # its entries count as abandoned after 10 ms
    await rig.streams.ensure_group(rig.streams.names.work, rs.FLUSHER_GROUP)
    await rig.submit([new(1)])
    await rig.submit([new(2)])
    dead_entry = await take(rig, f"{DEAD}/flusher-0")
    live_entry = await take(rig, f"{LIVE}/flusher-0")
    assert dead_entry and live_entry
    await Heartbeat(rig.streams.redis, rig.streams.names, LIVE, every_ms=60_000).beat()
    await anyio.sleep(0.05)
    report = await rig.sweeper.take_over()
    assert report.taken_over_from == [f"{DEAD}/flusher-0"]
    consumers = {
        c.name: c.pending
        for c in await rig.streams.consumers(rig.streams.names.work, rs.FLUSHER_GROUP)
    }
    assert f"{DEAD}/flusher-0" not in consumers, "the dead process's consumer is dropped"
    assert consumers[f"{LIVE}/flusher-0"] == 1, "the live one keeps what it holds"
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-1"], "the taken-over operation is applied by another"


async def test_a_consumer_without_a_process_in_its_name_is_left_to_the_idle_rule() -> None:
    rig = Rig()
    rig.sweeper.heartbeat_ms = 5
    await rig.streams.ensure_group(rig.streams.names.work, rs.FLUSHER_GROUP)
    await rig.submit([new(1)])
    assert await take(rig, "old-style-name-flusher-0")
    await anyio.sleep(0.05)
    assert (await rig.sweeper.take_over()).taken_over_from == []
    assert rs.process_of("old-style-name-flusher-0") is None
    assert rs.process_of(f"{LIVE}/inbox-1") == LIVE


async def test_a_clean_stop_removes_the_key_and_a_beat_sets_it_to_expire() -> None:
    rig = Rig()
    beat = Heartbeat(rig.streams.redis, rig.streams.names, LIVE, every_ms=1000)
    await beat.beat()
    key = rig.streams.names.alive(LIVE)
    assert 2000 < await rig.streams.redis.pttl(key) <= 3000
    await beat.stop()
    assert not await rig.streams.redis.exists(key)


async def test_live_readers_claim_what_a_dead_reader_held_older_than_a_bound() -> None:
    rig = Rig()
    streams, names = rig.streams, rig.streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    ids = [await streams.redis.xadd(names.outcomes, {"o": str(n)}) for n in range(3)]
    dead = rs.consumer_name(DEAD, "notifier")
    await streams.redis.xreadgroup(rs.NOTIFIER_GROUP, dead, {names.outcomes: ">"}, count=3)
    live = rs.consumer_name(LIVE, "notifier")
    await Heartbeat(streams.redis, names, LIVE, every_ms=60_000).beat()
    await anyio.sleep(0.02)
    older = await streams.claim_from_dead(
        names.outcomes, rs.NOTIFIER_GROUP, live, min_idle_ms=10, count=10, below=ids[2]
    )
    assert [entry_id for entry_id, _ in older] == ids[:2]
    assert await streams.dead_consumers(names.outcomes, rs.NOTIFIER_GROUP) == [(dead, 1)]
    await anyio.sleep(0.02)
    rest = await streams.claim_from_dead(
        names.outcomes, rs.NOTIFIER_GROUP, live, min_idle_ms=10, count=10
    )
    assert [entry_id for entry_id, _ in rest] == ids[2:]
    again = await streams.claim_from_dead(
        names.outcomes,
        rs.NOTIFIER_GROUP,
        rs.consumer_name("other", "notifier"),
        min_idle_ms=10,
        count=10,
    )
    assert again == [], "a live consumer's entries are never taken"
