"""`streamsvc run` killed, stopped and robbed of its Redis data while under load."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from benchmarks import scheduling, workload
from benchmarks.harness import ServiceProcess, count_status, produce
from streamsvc.adapters import streams as rs
from tests.conftest import settings_env
from tests.pipeline import eventually, statuses

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def service(database: str, prefix: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    env = settings_env(
        database, prefix, STREAMSVC_CLAIM_IDLE_MS="1000", BATCH_PROCESS_OPERATION_LIMIT="500"
    )
    process = ServiceProcess(env, tmp_path)
    yield process
    process.stop()


def at_least(conn: asyncpg.Connection, status: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await count_status(conn, status) >= n

    return check


async def finishes_exactly_once(conn: asyncpg.Connection, w: workload.Workload) -> None:
    """Wait until every operation of ``w`` is finished, then assert each effect landed
    once and the statuses are exactly the expected ones: the 1% poison FAIL, once, with
    the rest; nothing left PROCESSING or lost."""
    expected = workload.expected_statuses(w)
    await eventually(at_least(conn, "SUCCESS", expected["SUCCESS"]), within=90)
    await workload.verify(conn, w)
    assert await statuses(conn) == expected


async def test_sigkill_mid_flush_then_restart_applies_everything_exactly_once(
    service: ServiceProcess, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    w = workload.build(20_000, seed=3)
    await workload.seed(conn, w)
    await service.start()
    await produce(redis, rs.Names(prefix).inbox, w.ops)
    for progress in (2_000, 8_000):  # kill twice, at different points of the run
        await eventually(at_least(conn, "SUCCESS", progress), within=60)
        service.kill()
        done = (await statuses(conn)).get("SUCCESS", 0)
        assert done < 20_000, "the kill must land while work is still in flight"
        await service.start()
    await finishes_exactly_once(conn, w)
    assert await service.terminate() == 0


async def test_sigkill_with_scheduled_prioritized_and_ordered_operations(
    service: ServiceProcess, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    """The kills land while delayed operations are held or taken by the scheduler,
    priorities 0-9 are queued and keys' updates are parked behind each other: after the
    restarts everything is applied once, no delayed one before its runAt, and each key's
    updates in the order they were sent."""
    rng = random.Random(13)
    w = workload.build(20_000, seed=3)
    for op in w.ops:
        if rng.random() < 0.3:
            op["priority"] = rng.randint(1, 9)
    rows = [f"row-{n}" for n in range(20)]
    keyed = scheduling.keyed_updates(rows, 50)
    late = scheduling.delayed(1_000, low_ms=500, high_ms=6_000)
    ops = _shuffled_keeping_order(w.ops, keyed, late, rng=rng)
    await workload.seed(conn, w)
    await scheduling.seed_rows(conn, rows)
    await service.start()
    await produce(redis, rs.Names(prefix).inbox, ops, pipeline=100)
    for progress in (2_000, 8_000):
        await eventually(at_least(conn, "SUCCESS", progress), within=60)
        service.kill()
        held, parked = await conn.fetchrow(HELD_AND_PARKED)
        assert held and parked, "the kill must land while some wait for runAt and their key"
        await service.start()
    expected = workload.expected_statuses(w)
    expected["SUCCESS"] += len(keyed) + len(late)
    await eventually(at_least(conn, "SUCCESS", expected["SUCCESS"]), within=90)
    await workload.verify(conn, w)
    assert await statuses(conn) == expected
    base = scheduling.DELAYED_BASE
    assert await scheduling.orders_between(conn, base, base + len(late)) == len(late)
    lateness = await scheduling.lateness(conn)
    assert lateness.early == 0 and len(lateness.ms) == len(late)
    problems = await scheduling.key_order_problems(conn, dict.fromkeys(rows, 50))
    assert not problems, "\n".join(problems)
    assert await service.terminate() == 0


# Pending operations still ahead of their runAt, and keyed ones parked behind another.
HELD_AND_PARKED = """
SELECT count(*) FILTER (WHERE run_at > now()), count(*) FILTER (WHERE parked)
FROM "BatchOperations" WHERE status IN ('UNPROCESSED', 'PROCESSING')
"""


def _shuffled_keeping_order(
    *lists: list[dict[str, Any]], rng: random.Random
) -> list[dict[str, Any]]:
    """Every operation of ``lists``, interleaved at random, each list's in its order."""
    picks = [n for n, ops in enumerate(lists) for _ in ops]
    rng.shuffle(picks)
    rests = [iter(ops) for ops in lists]
    return [next(rests[n]) for n in picks]


async def test_sigterm_under_load_drains_and_exits_zero(
    service: ServiceProcess, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    w = workload.build(20_000, seed=5)
    await workload.seed(conn, w)
    await service.start()
    await produce(redis, rs.Names(prefix).inbox, w.ops)
    await eventually(at_least(conn, "SUCCESS", 1_000), within=60)
    assert await service.terminate() == 0
    log = service.log()
    assert '"service.stopping"' in log and '"service.stopped"' in log
    assert "PROCESSING" not in await statuses(conn)
    await service.start()  # whatever was not finished is picked up by the next run
    await finishes_exactly_once(conn, w)
    assert await service.terminate() == 0


async def test_redis_flushall_during_a_run_loses_nothing(
    database: str,
    prefix: str,
    tmp_path: Path,
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
) -> None:
    env = settings_env(
        database,
        prefix,
        BATCH_PROCESS_OPERATION_LIMIT="50",
        STREAMSVC_FLUSHERS="1",
        BATCH_PROCESS_OPERATION_INTERVAL="300",
    )
    service = ServiceProcess(env, tmp_path)
    w = workload.build(10_000, seed=9)
    await workload.seed(conn, w)
    try:
        await service.start()
        await produce(redis, rs.Names(prefix).inbox, w.ops)
        stored = await eventually_stored(conn, 10_000)
        assert stored.get("SUCCESS", 0) < 10_000, "Redis must be wiped while work is pending"
        await redis.flushall()
        await finishes_exactly_once(conn, w)
        assert '"sweep.rows_reenqueued"' in service.log()
        assert await service.terminate() == 0
    finally:
        service.stop()


async def eventually_stored(conn: asyncpg.Connection, n: int) -> dict[str, int]:
    async def all_stored() -> bool:
        return bool(await conn.fetchval('SELECT count(*) FROM "BatchOperations"') >= n)

    await eventually(all_stored, within=60, every=0.01)
    return await statuses(conn)


async def test_malformed_inbox_entries_do_not_disturb_a_running_service(
    service: ServiceProcess, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    await service.start()
    good = {
        "operationType": "ORDER_CREATED",
        "table": "orders",
        "action": "insert",
        "values": {"id": 1, "customer": "c", "amount": 1},
    }
    bad = ["{", json.dumps({"operationType": "X", "sql": "TRUNCATE orders"}), json.dumps([1])]
    inbox = rs.Names(prefix).inbox
    for raw in bad:
        await redis.xadd(inbox, {"op": raw})
    await redis.xadd(inbox, {"op": json.dumps(good)})
    await eventually(at_least(conn, "SUCCESS", 1))
    assert await redis.xlen(rs.Names(prefix).rejects) == 3
    assert service.proc is not None and service.proc.poll() is None
    assert await service.terminate() == 0


async def test_replays_racing_sigkills_apply_each_operation_once(
    service: ServiceProcess, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    """3,000 increments fail (a CHECK the counters break), the cause is mended, and they
    are replayed by three `streamsvc replay` processes at once while the service is killed
    twice mid-flush: in the end each increment landed exactly once (the counters' sum is
    the count: a second application would show), with its attempts and history."""
    n, counters = 3_000, 30
    await conn.execute(
        "INSERT INTO counters (name, value) SELECT 'r' || g, 0 FROM generate_series(0, $1) g",
        counters - 1,
    )
    await conn.execute("ALTER TABLE counters ADD CONSTRAINT stop CHECK (value <= 0)")
    bumps = [
        {"operationType": "BUMP", "sql": workload.INCREMENT_SQL, "params": [f"r{i % counters}"]}
        for i in range(n)
    ]
    await service.start()
    await produce(redis, rs.Names(prefix).inbox, bumps)
    await eventually(at_least(conn, "FAIL", n), within=90)
    await conn.execute("ALTER TABLE counters DROP CONSTRAINT stop")
    replays = [service.replay_process("--type", "BUMP") for _ in range(3)]
    for progress in (300, 1_500):
        await eventually(at_least(conn, "SUCCESS", progress), within=60)
        service.kill()
        await service.start()
    try:
        for replay in replays:
            assert replay.wait(timeout=60) == 0, service.replay_log(replay)
    finally:
        for replay in replays:
            replay.kill()
            replay.wait()
    await eventually(at_least(conn, "SUCCESS", n), within=90)
    assert await conn.fetchval("SELECT sum(value) FROM counters WHERE name LIKE 'r%'") == n
    rows = await conn.fetch(
        """SELECT status, attempts, jsonb_array_length(history) AS ended, count(*)
           FROM "BatchOperations" GROUP BY 1, 2, 3"""
    )
    assert [tuple(r) for r in rows] == [("SUCCESS", 2, 1, n)]
    assert await service.terminate() == 0


async def test_a_stop_signal_delivered_twice_at_once_still_drains(
    service: ServiceProcess, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    """Ctrl-C reaches the whole process group, and `just run` forwards it again: the two
    arrive together and are one request to stop, drained within the grace period."""
    w = workload.build(5_000, seed=8)
    await workload.seed(conn, w)
    await service.start()
    await produce(redis, rs.Names(prefix).inbox, w.ops)
    await eventually(at_least(conn, "SUCCESS", 500), within=60)
    assert service.proc is not None
    service.proc.send_signal(signal.SIGINT)
    assert await service.terminate() == 0
    assert '"service.stopping"' in service.log()
    assert '"service.grace_expired"' not in service.log(), "the second signal cut it short"
