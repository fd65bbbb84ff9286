"""Retention on the real servers: which rows go and which stay, a delete that never waits
for anyone, and stream trims that never drop an entry a consumer group has not acked."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from benchmarks.harness import REDIS_URL
from benchmarks.retention import old_left, seed_old
from streamsvc.actors.retention import Retention
from streamsvc.adapters import postgres
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import LockWait
from streamsvc.catalog import Catalog
from streamsvc.store.postgres import EXPIRE_LOCK_WAIT_MS, PgStore
from tests.conftest import PG, make_settings

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

WEEK_S = 7 * 86_400.0


@pytest.fixture
async def store(database: str, prefix: str) -> AsyncIterator[PgStore]:
    settings = make_settings(database, prefix)
    pool = await postgres.create_pool(settings, size=2, flushing=False)
    yield PgStore(pool, Catalog(settings.allow_list))
    await pool.close()


@pytest.fixture
async def streams(prefix: str) -> AsyncIterator[rs.Streams]:
    client = rs.connect(REDIS_URL)
    yield rs.Streams(client, rs.Names(prefix), maxlen=5)
    await client.aclose()


def retention(store: PgStore, streams: rs.Streams, *, older_than_s: float) -> Retention:
    return Retention(
        store, streams, older_than_s=older_than_s, batch=4, interval_ms=1000, pause_s=0
    )


async def by_status(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        'SELECT operation_type, status, count(*) FROM "BatchOperations" GROUP BY 1, 2'
    )
    return {(r[0], r[1]): r[2] for r in rows}


async def seed_mix(conn: asyncpg.Connection) -> None:
    """Finished 10 days ago (SUCCESS, FAIL, CANCELLED), finished a day ago, and pending rows
    stored 10 days ago (UNPROCESSED, PROCESSING: they never finished)."""
    for status in ("SUCCESS", "FAIL", "CANCELLED"):
        await seed_old(conn, 5, days=10, status=status)
    await seed_old(conn, 3, days=1, operation_type="NEW")
    for status in ("UNPROCESSED", "PROCESSING"):
        await seed_old(conn, 2, days=10, status=status, operation_type="PENDING")


async def test_rows_finished_before_the_window_go_newer_and_pending_ones_stay(
    store: PgStore, streams: rs.Streams, conn: asyncpg.Connection
) -> None:
    await seed_mix(conn)
    report = await retention(store, streams, older_than_s=WEEK_S).cycle()
    assert report.deleted_rows == 15  # four batches of at most 4
    assert await by_status(conn) == {
        ("NEW", "SUCCESS"): 3,
        ("PENDING", "UNPROCESSED"): 2,
        ("PENDING", "PROCESSING"): 2,
    }
    assert (await retention(store, streams, older_than_s=WEEK_S).cycle()).deleted_rows == 0


async def test_zero_days_keeps_every_row(
    store: PgStore, streams: rs.Streams, conn: asyncpg.Connection
) -> None:
    await seed_mix(conn)
    before = await by_status(conn)
    assert (await retention(store, streams, older_than_s=0).cycle()).deleted_rows == 0
    assert await by_status(conn) == before


async def test_a_delete_skips_a_row_another_transaction_holds_instead_of_waiting(
    store: PgStore, conn: asyncpg.Connection, database: str
) -> None:
    await seed_old(conn, 10, days=10)
    other = await asyncpg.connect(database=database, **PG)
    try:
        tx = other.transaction()
        await tx.start()
        held = await other.fetchval(
            """SELECT id FROM "BatchOperations" ORDER BY processed_at LIMIT 1 FOR UPDATE"""
        )
        started = time.monotonic()
        # Without SKIP LOCKED this would wait for `other`, then fail as a LockWait.
        assert await store.expire(WEEK_S, 100) == 9
        assert time.monotonic() - started < 1.0
        assert await old_left(conn) == 1
        await tx.rollback()
        assert await store.expire(WEEK_S, 100) == 1
        assert (
            await conn.fetchval('SELECT count(*) FROM "BatchOperations" WHERE id = $1', held) == 0
        )
    finally:
        await other.close()


async def test_a_delete_gives_up_on_a_busy_table_within_its_lock_wait(
    store: PgStore, streams: rs.Streams, conn: asyncpg.Connection, database: str
) -> None:
    """A table lock (DDL, say) held elsewhere: the delete waits EXPIRE_LOCK_WAIT_MS, not
    the pool's lock_timeout (15 s by default), and the cycle leaves the rows for later."""
    await seed_old(conn, 10, days=10)
    other = await asyncpg.connect(database=database, **PG)
    try:
        async with other.transaction():
            await other.execute('LOCK TABLE "BatchOperations" IN ACCESS EXCLUSIVE MODE')
            started = time.monotonic()
            with pytest.raises(LockWait):
                await store.expire(WEEK_S, 100)
            assert time.monotonic() - started < 1.0 + EXPIRE_LOCK_WAIT_MS / 1000
            report = await retention(store, streams, older_than_s=WEEK_S).cycle()
            assert report.deleted_rows == 0
        assert await old_left(conn) == 10
        assert (await retention(store, streams, older_than_s=WEEK_S).cycle()).deleted_rows == 10
    finally:
        await other.close()
