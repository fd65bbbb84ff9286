"""Cluster mode (STREAMSVC_REDIS_CLUSTER=on) on a real Redis Cluster of three masters that
the module starts (tests.cluster): the shards' keys share a slot each and the shards sit
on different masters, every door's operations land once and are announced, the acks that
add to a stream of another slot (dead letters) work, and rate limits count cluster-wide."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from benchmarks import workload as mixed
from streamsvc.adapters import streams as rs
from streamsvc.ratelimit import RateLimiter
from streamsvc.settings import Settings
from streamsvc.validate import Caller
from tests import checker
from tests.cluster import Cluster
from tests.conftest import make_settings
from tests.pipeline import eventually, served_with_clients

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

N = 1_200


def slot(key: str) -> int:
    return key_slot(key.encode())


def on_cluster(database: str, prefix: str, redis_cluster: Cluster, **more: str) -> Settings:
    return make_settings(
        database,
        prefix,
        REDIS_URL=redis_cluster.url,
        STREAMSVC_REDIS_CLUSTER="on",
        BATCH_PROCESS_OPERATION_LIMIT="100",
        **more,
    )


def test_each_shard_keeps_its_streams_in_one_slot_on_a_master_of_its_own(
    redis_cluster: Cluster,
) -> None:
    names = rs.Names.layout("streamsvc", shards=3, cluster=True)
    for shard in names.shards:
        assert {slot(k) for k in (*shard.work_streams, shard.outcomes)} == {slot(shard.work)}
    owners = [redis_cluster.owner(slot(shard.work)) for shard in names.shards]
    assert sorted(owners) == sorted(redis_cluster.ports)


async def test_every_door_lands_once_and_is_announced_with_the_work_spread_over_shards(
    database: str, prefix: str, conn: asyncpg.Connection, redis_cluster: Cluster
) -> None:
    settings = on_cluster(database, prefix, redis_cluster)
    await mixed.seed(conn, mixed.build(0))
    await checker.seed(conn)
    ops = checker.workload("cluster", N)
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        async with (
            checker.collecting(settings.events_exchange) as events,
            served_with_clients(settings) as served,
        ):
            for start in range(0, N // 2, 100):  # half over HTTP, in lists of 100
                answer = await served.http.post(
                    "/api/operations/batch", json=ops[start : start + 100]
                )
                assert answer.status_code == 200, answer.text
            inbox = rs.Names(prefix).inbox
            for op in ops[N // 2 :]:  # half through the inbox
                await client.xadd(inbox, {"op": json.dumps(op)})
            await served.service.inbox.run(burst=True)

            async def announced() -> bool:
                return sum(1 for n in range(N) if events.seen[checker.user_id("cluster", n)]) == N

            await eventually(announced, within=60, every=0.2)
            tally = await checker.check(conn, "cluster", N, events)
            assert tally.clean, (tally, await checker.troubles(conn, "cluster", N))
            service = served.service
            shards = service.streams.names.shards
            read = [await entries_read(client, shard) for shard in shards]
            assert len(shards) == 3 and all(read), f"each shard took work: {read}"
            assert [f.streams.names for f in service.flushers] == list(shards)
            assert [n.streams.names for n in service.notifiers] == list(shards)
    finally:
        await client.aclose()


async def entries_read(client: Any, shard: rs.Names) -> int:
    """Work entries the flushers' group has read from ``shard``'s streams."""
    total = 0
    for stream in shard.work_streams:
        if await client.exists(stream):
            for group in await client.xinfo_groups(stream):
                total += int(group["entries-read"] or 0)
    return total


async def test_a_dead_letter_is_kept_beside_an_ack_of_another_slot(
    prefix: str, redis_cluster: Cluster
) -> None:
    """The dead letters' stream is the deployment's, in a slot of its own: added first,
    then the shard's entries acked in their own slot's transaction."""
    streams = rs.open_streams(redis_cluster.url, prefix, shards=3, cluster=True)
    try:
        shard = streams.names.shards[1]
        assert slot(shard.outcomes) != slot(shard.dead)
        await streams.ensure_group(shard.outcomes, rs.NOTIFIER_GROUP)
        await streams.add(shard.outcomes, [{"o": b"x"}])
        (entry_id, _), *_ = await streams.read(
            shard.outcomes, rs.NOTIFIER_GROUP, "c", count=10, block_ms=None
        )
        await streams.on(shard).ack_with(
            shard.outcomes, rs.NOTIFIER_GROUP, [entry_id], shard.dead, [{"reason": "undeliverable"}]
        )
        assert await streams.length(shard.outcomes) == 0
        assert await streams.length(shard.dead) == 1
    finally:
        await streams.redis.aclose()


async def test_a_keys_rate_is_counted_across_processes_on_the_cluster(
    prefix: str, redis_cluster: Cluster
) -> None:
    clients = [rs.connect(redis_cluster.url, cluster=True) for _ in range(2)]
    try:
        one, two = (
            RateLimiter(c, prefix=prefix, default_ops=0, cluster_url=redis_cluster.url)
            for c in clients
        )
        caller = Caller("shared", rate_limit_ops=4)
        assert await one.admit(caller, 3) is None
        refusal = await two.admit(caller, 2)
        assert refusal is not None and refusal.retry_after_s is not None
    finally:
        for limiter in (one, two):
            await limiter.aclose()
        for client in clients:
            await client.aclose()


async def test_each_shard_knows_when_its_master_started(
    prefix: str, redis_cluster: Cluster
) -> None:
    """What bounds the outcomes a restarted master lost (streamsvc.actors.announcements)."""
    streams = rs.open_streams(redis_cluster.url, prefix, shards=3, cluster=True)
    try:
        await streams.open()
        now_ms = await streams.now_ms()
        for shard in streams.names.shards:
            started = await streams.started_ms(shard.epoch)
            assert started is not None and now_ms - 3_600_000 < started <= now_ms + 1000
    finally:
        await streams.redis.aclose()
