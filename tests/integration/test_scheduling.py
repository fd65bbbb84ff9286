"""runAt and delayMs, orderingKey and priority on the real servers (docs/scheduling.md)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

from benchmarks.harness import REDIS_URL
from streamsvc.adapters import streams as rs
from streamsvc.model import Receipt
from streamsvc.settings import Settings
from streamsvc.store.postgres import PgStore
from streamsvc.supervisor import Service
from streamsvc.validate import ANONYMOUS, Caller
from tests.conftest import make_settings
from tests.pipeline import drain, eventually, ops, order, running, serving, until_applied

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def submit(service: Service, *bodies: dict[str, Any]) -> list[str]:
    """Store ``bodies`` as one submission (one caller, one request); their ids."""
    results = await service.ingress.submit(ops(list(bodies)), caller=ANONYMOUS, source="api")
    assert all(isinstance(r, Receipt) for r in results), results
    return [r.id for r in results if isinstance(r, Receipt)]


async def row(conn: asyncpg.Connection, op_id: str) -> asyncpg.Record:
    found = await conn.fetchrow(
        'SELECT status, attempts, run_at, processed_at, wake_at FROM "BatchOperations" '
        "WHERE id = $1::uuid",
        op_id,
    )
    assert found is not None
    return found


async def applied_once(conn: asyncpg.Connection, op_id: str, order_id: int) -> None:
    """Wait until ``op_id`` succeeded; then its effect is there once, after its runAt, in
    one attempt."""
    await until_applied(conn, by="id", value=op_id)
    done = await row(conn, op_id)
    assert done["attempts"] == 1
    assert done["processed_at"] >= done["run_at"], "applied before its runAt"
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE id = $1", order_id) == 1


async def taken_by_a_scheduler(conn: asyncpg.Connection, op_id: str) -> None:
    async def taken() -> bool:
        return (await row(conn, op_id))["wake_at"] is None

    await eventually(taken, within=10, every=0.01)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    async with serving(settings) as service:
        yield service


# -- runAt and delayMs -------------------------------------------------------------------


async def test_a_delayed_operation_is_applied_after_its_run_at_and_not_before(
    service: Service, conn: asyncpg.Connection
) -> None:
    (op_id,) = await submit(service, order(1, delayMs=1500))
    held = await row(conn, op_id)
    assert held["wake_at"] == held["run_at"], "stored held for its runAt"
    early = held["run_at"] - dt.timedelta(milliseconds=300)

    async def nearly_due() -> bool:
        return bool(await conn.fetchval("SELECT clock_timestamp() >= $1", early))

    await eventually(nearly_due, within=5, every=0.01)
    assert (await row(conn, op_id))["status"] == "UNPROCESSED"
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0
    await applied_once(conn, op_id, 1)
    done = await row(conn, op_id)
    lateness = done["processed_at"] - done["run_at"]
    assert lateness < dt.timedelta(seconds=2), f"applied {lateness} after its runAt"


async def test_a_run_at_in_the_past_is_applied_at_once(
    service: Service, conn: asyncpg.Connection
) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).isoformat()
    (op_id,) = await submit(service, order(1, runAt=past))
    assert (await row(conn, op_id))["wake_at"] is None, "not held"
    await applied_once(conn, op_id, 1)


async def test_a_held_operation_survives_a_service_restart(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    # a sweep interval of 2 s: the scheduler takes what is due within 1 s
    settings = make_settings(database, prefix, BATCH_PROCESS_OPERATION_INTERVAL="2000")
    async with serving(settings) as first:
        (op_id,) = await submit(first, order(1, delayMs=3000))
        await taken_by_a_scheduler(conn, op_id)  # 1 s ahead of its runAt
    stopped = await row(conn, op_id)
    assert stopped["processed_at"] is None
    assert stopped["wake_at"] == stopped["run_at"], "given back by the stopping scheduler"
    async with serving(settings):
        await applied_once(conn, op_id, 1)


async def test_a_held_operation_survives_redis_losing_its_data(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(database, prefix, BATCH_PROCESS_OPERATION_INTERVAL="300")
    redis = rs.connect(REDIS_URL)
    try:
        async with serving(settings) as service, anyio.create_task_group() as tg:
            tg.start_soon(service.sweeper.run)
            held, taken = await submit(
                service, order(1, delayMs=2500), order(2, delayMs=1200, priority=5)
            )
            await taken_by_a_scheduler(conn, taken)
            keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
            assert keys, "the streams exist"
            await redis.delete(*keys)  # every stream and consumer group of this service
            await applied_once(conn, taken, 2)
            await applied_once(conn, held, 1)
            for _ in range(2):  # finished: nothing is re-enqueued
                assert (await service.sweeper.sweep()).reenqueued_rows == 0
            tg.cancel_scope.cancel()
    finally:
        await redis.aclose()
    assert await conn.fetchval('SELECT sum(attempts) FROM "BatchOperations"') == 2
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2


async def test_a_recorded_tick_only_moves_forward(settings: Settings) -> None:
    async with running(settings) as service:
        store = PgStore(service.pool, service.catalog)
        tick = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        await store.record_tick("s", tick)
        await store.record_tick("s", tick - dt.timedelta(seconds=1))
        assert await store.last_ticks() == {"s": tick}
        await store.record_tick("s", tick + dt.timedelta(seconds=1))
        assert await store.last_ticks() == {"s": tick + dt.timedelta(seconds=1)}


# -- orderingKey -------------------------------------------------------------------------


async def test_a_fail_does_not_stop_its_key(service: Service, conn: asyncpg.Connection) -> None:
    ids = await submit(
        service,
        order(1, orderingKey="k"),
        order(1, orderingKey="k"),  # a duplicate key: FAIL
        order(3, orderingKey="k"),
    )
    await until_applied(conn, by="id", value=ids[2])
    statuses = [(await row(conn, op_id))["status"] for op_id in ids]
    assert statuses == ["SUCCESS", "FAIL", "SUCCESS"]
    assert [r[0] for r in await conn.fetch("SELECT id FROM orders ORDER BY id")] == [1, 3]


async def test_a_key_is_its_callers_so_another_caller_cannot_hold_it_back(
    service: Service, conn: asyncpg.Connection
) -> None:
    """A hostile caller sending orderingKey "k" held for a day does not hold back another
    caller's "k": each caller's keys are its own."""
    hostile, victim = Caller(name="hostile"), Caller(name="victim")
    blocker = order(1, orderingKey="k", delayMs=86_400_000)
    (held,) = await service.ingress.submit(ops([blocker]), caller=hostile, source="api")
    (mine,) = await service.ingress.submit(
        ops([order(2, orderingKey="k")]), caller=victim, source="api"
    )
    assert isinstance(held, Receipt) and isinstance(mine, Receipt)
    await until_applied(conn, by="id", value=mine.id)
    assert (await row(conn, held.id))["status"] == "UNPROCESSED"


async def test_one_keys_operations_apply_in_the_order_of_their_bulk_submission(
    service: Service, conn: asyncpg.Connection
) -> None:
    await conn.execute("INSERT INTO counters VALUES ('hot', -1)")

    def set_to(n: int) -> dict[str, Any]:
        return {
            "operationType": "COUNTER_SET",
            "table": "counters",
            "action": "update",
            "values": {"value": n},
            "key": {"name": "hot"},
            "orderingKey": "hot",
        }

    bodies: list[dict[str, Any]] = []
    for n in range(50):  # each update followed by an insert that logs it, all on one key
        bodies += [set_to(n), order(n, orderingKey="hot")]
    bodies.append(order(1000))  # no key: not held up by them
    ids = await submit(service, *bodies)
    await until_applied(conn, by="id", value=ids[-2], within=60)
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'hot'") == 49
    done = await conn.fetch(
        'SELECT id::text FROM "BatchOperations" WHERE ordering_key = $1 ORDER BY processed_at',
        "hot",
    )
    assert [r[0] for r in done] == ids[:-1], "applied in the order they were sent"
    log = await conn.fetch("SELECT id FROM orders WHERE id < 1000 ORDER BY created_at, id")
    assert [r[0] for r in log] == list(range(50)), "each insert in its own later transaction"
    assert await conn.fetchval('SELECT count(DISTINCT batch_id) FROM "BatchOperations"') >= 100


# -- priority ----------------------------------------------------------------------------


async def test_priority_9_operations_overtake_a_stored_priority_0_backlog(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(database, prefix, BATCH_PROCESS_OPERATION_LIMIT="100")
    async with running(settings) as service:  # no flusher runs while they are stored
        for start in range(0, 3000, 500):
            await submit(service, *(order(i) for i in range(start, start + 500)))
        for i in range(20):  # after the whole backlog, one caller after the other
            await submit(service, order(10_000 + i, priority=9))
        await drain(service)
    assert await conn.fetchval("SELECT count(*) FROM orders") == 3020
    await assert_urgent_before_most(conn)


async def test_priority_9_operations_sent_while_a_backlog_drains_overtake_it(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    # One flusher, so no idle one picks them up: they must win their turns.
    settings = make_settings(
        database, prefix, BATCH_PROCESS_OPERATION_LIMIT="100", STREAMSVC_FLUSHERS="1"
    )
    async with running(settings) as service, anyio.create_task_group() as flushing:
        for start in range(0, 5000, 500):
            await submit(service, *(order(i) for i in range(start, start + 500)))
        flushing.start_soon(service.flushers[0].run)
        await eventually(succeeded(conn, 200), within=30, every=0.005)
        for i in range(20):
            await submit(service, order(10_000 + i, priority=9))
        await eventually(succeeded(conn, 5020), within=60)
        flushing.cancel_scope.cancel()
    await assert_urgent_before_most(conn)


def succeeded(conn: asyncpg.Connection, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        query = """SELECT count(*) FROM "BatchOperations" WHERE status = 'SUCCESS'"""
        return bool(await conn.fetchval(query) >= n)

    return check


async def assert_urgent_before_most(conn: asyncpg.Connection) -> None:
    """Every priority-9 operation was applied before half the priority-0 ones."""
    median = await conn.fetchval(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY processed_at) "
        'FROM "BatchOperations" WHERE priority = 0'
    )
    urgent = [
        r[0]
        for r in await conn.fetch('SELECT processed_at FROM "BatchOperations" WHERE priority = 9')
    ]
    assert len(urgent) == 20
    assert all(when < median for when in urgent), (max(urgent), median)
