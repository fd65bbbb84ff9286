"""Trimming the streams that only grow (Streams.trim, run by retention) on a real Redis:
whatever a consumer group has not acknowledged, pending or not yet delivered, stays;
acknowledged entries go past STREAMSVC_STREAM_MAXLEN, old ones by age; the inbox and the
work streams are never touched. (fakeredis's Lua has no XINFO GROUPS, hence Redis.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest

from benchmarks.harness import REDIS_URL
from streamsvc.actors.retention import Retention
from streamsvc.adapters import streams as rs
from streamsvc.store.memory import MemoryStore

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DAY_MS = 86_400_000


@pytest.fixture
async def streams(prefix: str) -> AsyncIterator[rs.Streams]:
    client = rs.connect(REDIS_URL)
    yield rs.Streams(client, rs.Names(prefix), maxlen=5)
    await client.aclose()


async def ids(streams: rs.Streams, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _ in await streams.redis.xrange(stream)]


async def read(streams: rs.Streams, group: str, count: int) -> list[bytes]:
    """Deliver ``count`` new outcome entries to ``group`` (left pending)."""
    entries = await streams.read(streams.names.outcomes, group, "c", count=count, block_ms=None)
    return [entry_id for entry_id, _ in entries]


async def test_over_maxlen_acked_outcomes_go_pending_and_undelivered_ones_stay(
    streams: rs.Streams,
) -> None:
    outcomes = streams.names.outcomes
    await streams.ensure_group(outcomes, rs.NOTIFIER_GROUP)
    added = await streams.add(outcomes, [{"n": str(i)} for i in range(20)])
    assert await ids(streams, outcomes) == added  # no cap at XADD: 20 > maxlen 5
    delivered = await read(streams, rs.NOTIFIER_GROUP, 10)
    # acked without XDEL, unlike the notifier, so that the trim has acked entries to find
    await streams.redis.xack(outcomes, rs.NOTIFIER_GROUP, *delivered[:5], delivered[7])

    assert await streams.trim(outcomes, age_ms=0) == 5
    # added[5] is the oldest pending entry: it and everything after it stay, added[7] too
    # (acked, but above a pending one), and every undelivered one.
    assert await ids(streams, outcomes) == added[5:]

    await streams.redis.xack(outcomes, rs.NOTIFIER_GROUP, *delivered[5:])
    assert await streams.trim(outcomes, age_ms=0) == 4
    # nothing pending: the last delivered entry (added[9]) is the safe point and stays
    assert await ids(streams, outcomes) == added[9:]


async def test_the_group_furthest_behind_decides(streams: rs.Streams) -> None:
    outcomes = streams.names.outcomes
    await streams.ensure_group(outcomes, rs.NOTIFIER_GROUP)
    await streams.ensure_group(outcomes, "audit")  # an operator's group that read nothing
    added = await streams.add(outcomes, [{"n": str(i)} for i in range(20)])
    await streams.redis.xack(
        outcomes, rs.NOTIFIER_GROUP, *await read(streams, rs.NOTIFIER_GROUP, 20)
    )
    assert await streams.trim(outcomes, age_ms=0) == 0
    await read(streams, "audit", 12)
    assert await streams.trim(outcomes, age_ms=0) == 0  # audit's twelve are pending
    await streams.redis.xack(outcomes, "audit", *added[:12])
    assert await streams.trim(outcomes, age_ms=0) == 11
    assert await ids(streams, outcomes) == added[11:]


async def old_and_new(streams: rs.Streams, stream: str) -> tuple[list[bytes], list[bytes]]:
    """Three entries two days old (explicit ids), then three new ones."""
    two_days_ago = int(time.time() * 1000) - 2 * DAY_MS
    old = [
        await streams.redis.xadd(stream, {"n": "old"}, id=f"{two_days_ago}-{i}") for i in range(3)
    ]
    new = await streams.add(stream, [{"n": "new"}] * 3)
    return old, new


async def test_by_age_old_entries_go_unless_a_group_still_needs_them(streams: rs.Streams) -> None:
    dead, outcomes = streams.names.dead, streams.names.outcomes
    _, new = await old_and_new(streams, dead)  # no group: owed to no one
    assert await streams.trim(dead, age_ms=DAY_MS) == 3
    assert await ids(streams, dead) == new

    await streams.ensure_group(outcomes, rs.NOTIFIER_GROUP)
    old, new = await old_and_new(streams, outcomes)
    assert await streams.trim(outcomes, age_ms=DAY_MS) == 0  # none delivered yet
    delivered = await read(streams, rs.NOTIFIER_GROUP, 2)
    await streams.redis.xack(outcomes, rs.NOTIFIER_GROUP, delivered[1])
    assert await streams.trim(outcomes, age_ms=DAY_MS) == 0  # old[0] is pending
    await streams.redis.xack(outcomes, rs.NOTIFIER_GROUP, delivered[0])
    # acked: old[0] goes; old[1] is the last delivered (the safe point), old[2] undelivered
    assert await streams.trim(outcomes, age_ms=DAY_MS) == 1
    assert await ids(streams, outcomes) == [*old[1:], *new]


async def test_a_stream_without_groups_is_cut_to_maxlen_oldest_first(streams: rs.Streams) -> None:
    dead = streams.names.dead
    added = await streams.add(dead, [{"n": str(i)} for i in range(12)])
    assert await streams.trim(dead, age_ms=0) == 7
    assert await ids(streams, dead) == added[7:]


async def test_with_the_notifier_stopped_no_outcome_is_lost_past_maxlen(
    streams: rs.Streams,
) -> None:
    """The notifier took a batch and died (its entries pending), and a thousand more came:
    a retention cycle, even with every entry past its age, drops none. The inbox and the
    work streams stay as they are too."""
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    added = await streams.add(names.outcomes, [{"o": str(i)} for i in range(1000)])
    await read(streams, rs.NOTIFIER_GROUP, 100)
    for stream in (names.inbox, names.work, names.work_of(9)):
        await streams.add(stream, [{"n": str(i)} for i in range(50)])
    retention = Retention(
        MemoryStore(), streams, older_than_s=0.001, batch=10, interval_ms=1000, pause_s=0
    )
    await anyio.sleep(0.01)  # every entry is now older than the retention age

    report = await retention.cycle()

    assert report.trimmed == {}
    assert await ids(streams, names.outcomes) == added
    for stream in (names.inbox, names.work, names.work_of(9)):
        assert await streams.length(stream) == 50
    # what the notifier does once back: its pending entries first, then the rest, each
    # acked and deleted; nothing is missing
    pending = await streams.read(
        names.outcomes, rs.NOTIFIER_GROUP, "c", count=1000, block_ms=None, own_pending=True
    )
    rest = await streams.read(names.outcomes, rs.NOTIFIER_GROUP, "c", count=1000, block_ms=None)
    assert [e for e, _ in pending + rest] == added
    assert all(fields for _, fields in pending + rest)
