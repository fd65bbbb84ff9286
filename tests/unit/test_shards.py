"""The streams split into shards (docs/redis-cluster.md): names, where new work goes, and
the sweeper watching every shard, over the memory store and fakeredis."""

from __future__ import annotations

import datetime as dt

import anyio
import fakeredis
import pytest
from redis.crc import key_slot

from streamsvc.actors.heartbeat import Heartbeat
from streamsvc.adapters import streams as rs
from streamsvc.model import work_decoder
from tests.unit.test_sweeper import Rig, new

pytestmark = pytest.mark.anyio


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_one_shard_on_one_redis_keeps_the_names_producers_and_operators_know() -> None:
    names = rs.Names.layout("streamsvc")
    assert names.shards == (names,)
    assert (names.work, names.work_of(9), names.outcomes) == (
        "streamsvc:work",
        "streamsvc:work:9",
        "streamsvc:outcomes",
    )


@pytest.mark.parametrize("prefix", ["streamsvc", "a", "orders-eu.2"])
@pytest.mark.parametrize("count", [1, 2, 3, 6, 16])
def test_each_shard_s_streams_share_a_slot_in_its_own_part_of_the_slot_space(
    prefix: str, count: int
) -> None:
    names = rs.Names.layout(prefix, shards=count, cluster=True)
    assert len(names.shards) == count
    for n, shard in enumerate(names.shards):
        keys = (*shard.work_streams, shard.outcomes)
        assert {slot(k) for k in keys} == {slot(shard.work)}
        assert n * rs.SLOTS // count <= slot(shard.work) < (n + 1) * rs.SLOTS // count
        assert shard.inbox == f"{prefix}:inbox" and shard.dead == f"{prefix}:dead"
    assert len({shard.work for shard in names.shards}) == count


def test_the_default_prefix_s_three_shards_are_tagged_0_1_2() -> None:
    tags = [s.work for s in rs.Names.layout("streamsvc", shards=3, cluster=True).shards]
    assert tags == ["{streamsvc:0}:work", "{streamsvc:1}:work", "{streamsvc:2}:work"]


def test_retention_trims_every_shard_s_outcomes_and_never_a_work_stream() -> None:
    names = rs.Names.layout("p", shards=3)
    trimmed = names.trimmed
    assert [s for label, s in trimmed if label == "outcomes"] == [s.outcomes for s in names.shards]
    assert not {s for _, s in trimmed} & {w for s in names.shards for w in s.work_streams}


async def test_new_work_goes_to_each_shard_in_turn_entry_by_entry() -> None:
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names.layout("p", shards=3))
    ready = (await Rig().store.intake([new(n) for n in range(60)])).ready
    log = _Log()
    assert await streams.enqueue(ready, 10, log=log, event="e")
    lengths = [await streams.length(s.work) for s in streams.names.shards]
    assert lengths == [2, 2, 2], "six entries of ten, two on each shard"
    ids = []
    for shard in streams.names.shards:
        for _, fields in await streams.redis.xrange(shard.work):
            ids += [w.id for w in work_decoder.decode(fields[b"ops"])]
    assert sorted(ids) == sorted(w.id for w in ready)


async def test_a_dead_flusher_s_entries_on_any_shard_are_taken_over() -> None:
    rig = Rig()
    rig.streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names.layout("t", shards=3))
    rig.sweeper.streams = rig.sweeper.manage.streams = rig.streams
    rig.sweeper.heartbeat_ms = 5
    shard = rig.streams.names.shards[2]
    await rig.streams.ensure_group(shard.work, rs.FLUSHER_GROUP)
    stored = await rig.store.intake([new(1)])
    await rig.streams.add_each(rs.work_entries(shard, stored.ready, 100))
    dead = rs.consumer_name("host-1-aaaaaa", "flusher-2")
    assert await rig.streams.redis.xreadgroup(rs.FLUSHER_GROUP, dead, {shard.work: ">"}, count=1)
    await Heartbeat(rig.streams.redis, rig.streams.names, "host-2", every_ms=60_000).beat()
    await anyio.sleep(0.05)
    assert (await rig.sweeper.take_over()).taken_over_from == [dead]
    rig.flusher.streams = rig.streams.on(shard)
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-1"]


class _Log:
    def warning(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("Redis took every entry")


async def test_a_shard_whose_master_lost_its_data_alone_is_noticed() -> None:
    """Each shard's key sits in its outcome stream's slot, so it goes with that master."""
    rig = Rig(age=dt.timedelta(0))
    rig.streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names.layout("t", shards=3))
    rig.sweeper.streams = rig.sweeper.announcements.streams = rig.streams
    rig.flusher.streams = rig.streams.on(rig.streams.names.shards[1])
    await rig.sweeper.sweep()  # names each shard's data
    stored = await rig.store.intake([new(1), new(2)])
    await rig.streams.add_each(rs.work_entries(rig.flusher.streams.names, stored.ready, 100))
    await rig.flusher.run(burst=True)  # the outcomes wait on shard 1's stream
    await rig.sweeper.sweep()
    lost = rig.streams.names.shards[1]
    assert slot(lost.epoch) == slot(lost.outcomes)
    await rig.streams.redis.delete(lost.epoch, lost.outcomes)
    assert (await rig.sweeper.sweep()).reannounced == 2
