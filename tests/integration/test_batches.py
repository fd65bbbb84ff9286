"""Batches with bad operations, repeated ids, lookups, and transient failures."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict

from streamsvc.adapters import postgres
from streamsvc.adapters import streams as rs
from streamsvc.model import Receipt, Rejection, Status, WorkOp
from streamsvc.settings import Settings
from streamsvc.validate import ANONYMOUS
from tests.conftest import PG, make_settings
from tests.pipeline import drain, eventually, ops, running, statuses

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def order(i: int, amount: object = 1, **extra: object) -> dict[str, object]:
    return {
        "operationType": "ORDER_CREATED",
        "table": "orders",
        "action": "insert",
        "values": {"id": i, "customer": "c", "amount": amount},
        **extra,
    }


async def test_poison_operations_fail_alone_and_good_ones_land_together(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    await conn.execute("INSERT INTO orders (id, customer, amount) VALUES (5, 'old', 1)")
    batch = [order(i) for i in range(100, 400)]
    batch[10] = order(5)  # duplicate primary key
    batch[50] = order(150_000, amount=-3)  # violates the CHECK constraint
    batch[90] = order(160_000, amount="lots")  # wrong type for numeric
    batch[200] = {
        "operationType": "BUMP",
        "sql": "UPDATE orders SET amount = $1 WHERE id = 1",
        "params": ["not a number"],
    }
    async with running(settings) as service:
        results = await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await drain(service)
    assert isinstance(results[200], Receipt)
    failed = {
        r[0]: r[1]
        for r in await conn.fetch(
            """SELECT (body->'values'->>'id')::int, error FROM "BatchOperations"
           WHERE status = 'FAIL' AND body ? 'values'"""
        )
    }
    assert set(failed) == {5, 150_000, 160_000}
    assert "duplicate key value violates unique constraint" in failed[5]
    assert "violates check constraint" in failed[150_000]
    assert 'invalid input syntax for type numeric: "lots"' in failed[160_000]
    sql_error = await conn.fetchval(
        """SELECT error FROM "BatchOperations" WHERE id = $1""", uuid.UUID(results[200].id)
    )
    assert sql_error == 'invalid input syntax for type numeric: "not a number"'
    assert await statuses(conn) == {"SUCCESS": 296, "FAIL": 4}
    batches = await conn.fetchval(
        """SELECT count(DISTINCT batch_id) FROM "BatchOperations" WHERE status = 'SUCCESS'"""
    )
    assert batches == 1, "every good operation lands in the one batch"
    assert await conn.fetchval("SELECT count(*) FROM orders") == 1 + 296 - 0


async def test_refusals_before_and_after_a_failed_statement_are_all_recorded(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Orders, then a statement, then payments: applied in that order, in three steps. The
    statement fails (its retry with savepoints finds it), a bad order and a bad payment
    are refused; every refusal ends FAIL with its own message, the rest in one batch."""
    bad_statement = {
        "operationType": "BUMP",
        "sql": "UPDATE orders SET amount = $1 WHERE id = 1",
        "params": ["not a number"],
    }
    payment = {"operationType": "PAID", "table": "payments", "action": "insert"}
    batch: list[Mapping[str, object]] = [
        order(1),
        order(2, amount=-1),
        bad_statement,
        {**payment, "values": {"id": 1, "order_id": 1, "amount": 5}},
        {**payment, "values": {"id": 2, "order_id": 1, "amount": "lots"}},
        order(3),
    ]
    async with running(settings) as service:
        await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await drain(service)
    rows = await conn.fetch(
        """SELECT operation_type, (body->'values'->>'id')::int, status, error, batch_id
           FROM "BatchOperations" """
    )
    failed = {(r[0], r[1]): r[3] for r in rows if r[2] == "FAIL"}
    assert set(failed) == {("ORDER_CREATED", 2), ("BUMP", None), ("PAID", 2)}
    assert "violates check constraint" in failed[("ORDER_CREATED", 2)]
    assert failed[("BUMP", None)] == 'invalid input syntax for type numeric: "not a number"'
    assert 'invalid input syntax for type numeric: "lots"' in failed[("PAID", 2)]
    assert await statuses(conn) == {"SUCCESS": 3, "FAIL": 3}
    assert len({r[4] for r in rows}) == 1, "one batch"
    assert await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM orders") == [1, 3]
    assert await conn.fetchval("SELECT array_agg(id) FROM payments") == [1]


async def test_bad_rows_read_the_same_whether_alone_or_found_in_a_group(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """A bad member of a multi-row statement is isolated inside PostgreSQL; one alone in
    its statement fails as the client reports it. Callers see the same text either way."""
    await conn.execute("INSERT INTO orders (id, customer, amount) VALUES (5, 'a', 1), (6, 'b', 1)")
    alone = {**order(6), "values": {"id": 6, "customer": "c", "amount": 1, "note": "n"}}
    batch = [order(i) for i in range(100, 140)] + [order(5), alone]
    async with running(settings) as service:
        await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await drain(service)
    failed = dict(
        await conn.fetch(
            """SELECT (body->'values'->>'id')::int, error FROM "BatchOperations"
               WHERE status = 'FAIL'"""
        )
    )
    message = 'duplicate key value violates unique constraint "orders_pkey"\nDETAIL:  Key (id)=({})'
    assert failed == {
        5: message.format(5) + " already exists.",
        6: message.format(6) + " already exists.",
    }
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2 + 40


async def test_repeated_user_operation_id_is_applied_once(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    await conn.execute("INSERT INTO counters VALUES ('hits', 0)")
    op_id = str(uuid.uuid4())
    bump = {
        "operationType": "BUMP",
        "userOperationId": op_id,
        "sql": "UPDATE counters SET value = value + 1 WHERE name = $1",
        "params": ["hits"],
    }
    async with running(settings) as service:
        first = await service.ingress.submit(ops([bump, bump]), caller=ANONYMOUS, source="api")
        assert [r.created for r in first if isinstance(r, Receipt)] == [True, False]
        await drain(service)
        again = await service.ingress.submit(ops([bump]), caller=ANONYMOUS, source="api")
        assert isinstance(again[0], Receipt)
        assert (again[0].id, again[0].created, again[0].status) == (op_id, False, Status.SUCCESS)
        await drain(service)
        view = await service.ingress.get(op_id)
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'hits'") == 1
    assert view is not None
    assert (view.status, view.attempts, view.source) == (Status.SUCCESS, 1, "api")
    assert view.operation.params == ["hits"]


async def test_get_operation_unknown_and_malformed_ids(settings: Settings) -> None:
    async with running(settings) as service:
        assert await service.ingress.get(str(uuid.uuid4())) is None
        assert await service.ingress.get("not-a-uuid") is None


async def test_refused_operations_store_nothing(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    bad: list[dict[str, object]] = [
        {"operationType": "X", "table": "secrets", "action": "insert", "values": {"id": 1}},
        {"operationType": "X", "sql": "DROP TABLE orders"},
        {"operationType": "X", "table": "orders", "action": "insert", "values": {"nope": 1}},
    ]
    async with running(settings) as service:
        results = await service.ingress.submit(
            ops([*bad, order(1)]), caller=ANONYMOUS, source="api"
        )
    assert [type(r) for r in results] == [Rejection, Rejection, Rejection, Receipt]
    assert [r.field for r in results[:3] if isinstance(r, Rejection)] == [
        "table",
        "sql",
        "values.nope",
    ]
    assert await statuses(conn) == {"UNPROCESSED": 1}


async def test_a_column_added_while_running_is_picked_up(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    async with running(settings) as service:
        await conn.execute("ALTER TABLE orders ADD COLUMN region text")
        service.catalog.min_refresh_s = 0
        with_region = {
            **order(1),
            "values": {"id": 1, "customer": "c", "amount": 1, "region": "eu"},
        }
        results = await service.ingress.submit(ops([with_region]), caller=ANONYMOUS, source="api")
        assert isinstance(results[0], Receipt)
        await drain(service)
    assert await conn.fetchval("SELECT region FROM orders WHERE id = 1") == "eu"


@asynccontextmanager
async def locked(database: str, sql: str, *args: object) -> AsyncIterator[asyncpg.Transaction]:
    """Another session holding the locks ``sql`` takes until the block ends (closing it)
    or the yielded transaction ends."""
    blocker = await asyncpg.connect(database=database, **PG)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(sql, *args)
        yield tx
    finally:
        await blocker.close()


def row_locked(database: str, name: str) -> AbstractAsyncContextManager[asyncpg.Transaction]:
    """The lock of counter ``name``."""
    return locked(database, "SELECT * FROM counters WHERE name = $1 FOR UPDATE", name)


def table_locked(database: str, table: str) -> AbstractAsyncContextManager[asyncpg.Transaction]:
    """The lock every batch writing ``table`` takes first (sql/apply_rows.sql)."""
    return locked(
        database, "SELECT pg_advisory_xact_lock(hashtextextended('streamsvc:' || $1, 0))", table
    )


def bump(name: str) -> dict[str, object]:
    return {
        "operationType": "BUMP",
        "sql": "UPDATE counters SET value = value + 1 WHERE name = $1",
        "params": [name],
    }


def lock_waits(logs: list[EventDict]) -> int:
    """How many batch tries ended because a lock wait ran out."""
    return sum(
        1 for e in logs if e["event"] == "flush.failed" and str(e["error"]).startswith("lock wait:")
    )


async def lands_after_waiting(
    settings: Settings,
    lock: AbstractAsyncContextManager[asyncpg.Transaction],
    batch: list[dict[str, object]],
) -> list[EventDict]:
    """Submit ``batch`` while another session holds ``lock``; let the flushers wait for it
    past two statement timeouts, then free it and drain. Returns the log events."""
    with capture_logs() as logs:
        async with lock as held, running(settings) as service, anyio.create_task_group() as tg:
            await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
            tg.start_soon(drain, service)

            async def waited_past_two_timeouts() -> bool:
                return lock_waits(logs) >= 8

            await eventually(waited_past_two_timeouts, every=0.01)
            await held.rollback()
    return logs


async def test_a_row_lock_wait_is_retried_uncounted_until_the_lock_is_gone(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """Another transaction holds a row of the batch for several statement timeouts: each
    wait ends at the lock timeout (a quarter of the statement timeout), and the batch is
    tried again, never cut, never counted as an attempt; once the row is free, all of it
    lands in one transaction."""
    settings = make_settings(database, prefix, STREAMSVC_STATEMENT_TIMEOUT_MS="400")
    await conn.execute("INSERT INTO counters VALUES ('locked', 0), ('free', 0)")
    batch = [bump("free"), order(1), bump("locked"), order(2), bump("free")]
    await lands_after_waiting(settings, row_locked(database, "locked"), batch)
    rows = await conn.fetch('SELECT status, attempts, batch_id FROM "BatchOperations"')
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCESS", 1)}
    assert len({r["batch_id"] for r in rows}) == 1, "one batch, never cut"
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'locked'") == 1
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'free'") == 2


async def test_a_table_lock_held_past_the_statement_timeout_fails_none_of_the_waiters(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """Another session holds the batch's table lock (the advisory lock every batch writing
    ``counters`` takes first) for several statement timeouts, as a long statement in
    another batch would: the waiting batch is neither cut nor failed, and lands once the
    lock is free."""
    settings = make_settings(database, prefix, STREAMSVC_STATEMENT_TIMEOUT_MS="300")
    await conn.execute("INSERT INTO counters VALUES ('a', 0), ('b', 0)")
    batch = [bump("a"), bump("b"), bump("a"), order(1)]
    logs = await lands_after_waiting(settings, table_locked(database, "public.counters"), batch)
    assert not [e for e in logs if e.get("next") in ("split", "fail")]
    rows = await conn.fetch('SELECT status, attempts, batch_id FROM "BatchOperations"')
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCESS", 1)}
    assert len({r["batch_id"] for r in rows}) == 1, "one batch, never cut"
    assert await conn.fetchval("SELECT sum(value) FROM counters") == 3


async def test_a_batch_waiting_longer_than_the_claim_idle_time_stays_its_flushers(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """The table lock is held for many times the sweeper's claim-idle time and its
    deliveries limit, with the sweeper running: the waiting flusher keeps its entry marked
    as its own, so the sweeper neither hands it out again nor dead-letters it, and the
    batch lands once, when the lock is free."""
    settings = make_settings(
        database,
        prefix,
        STREAMSVC_STATEMENT_TIMEOUT_MS="300",
        STREAMSVC_CLAIM_IDLE_MS="300",
        STREAMSVC_MAX_DELIVERIES="2",
        STREAMSVC_FLUSHERS="4",  # free flushers to take whatever is handed out again
        BATCH_PROCESS_OPERATION_INTERVAL="100",
    )
    await conn.execute("INSERT INTO counters VALUES ('a', 0)")
    async with (
        table_locked(database, "public.counters") as hold,
        running(settings) as service,
        anyio.create_task_group() as tg,
    ):
        await service.ingress.submit(ops([bump("a"), order(1)]), caller=ANONYMOUS, source="api")
        for flusher in service.flushers:  # an entry handed out again would be read
            tg.start_soon(flusher.run)
        until = time.monotonic() + 10 * 0.3 * 2  # ten times claim-idle times deliveries
        while time.monotonic() < until:
            await service.sweeper.sweep()
            await anyio.sleep(0.1)
        await hold.commit()

        async def landed() -> bool:
            return (await statuses(conn)).get("SUCCESS") == 2

        await eventually(landed, within=20)
        for flusher in service.flushers:
            flusher.stopping = True
        assert await service.streams.redis.xlen(service.streams.names.dead) == 0
    rows = await conn.fetch('SELECT status, attempts, batch_id FROM "BatchOperations"')
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCESS", 1)}
    assert await conn.fetchval("SELECT value FROM counters") == 1


async def test_a_slow_statement_fails_alone_and_the_batch_waiting_for_its_table_lands(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """A caller's statement that runs until the statement timeout holds its table's lock,
    each time it is tried; another flusher's batch on that table waits for it meanwhile.
    The slow operation ends FAIL (statement timeout); every operation of the waiting batch
    ends SUCCESS, none counted as an extra attempt."""
    settings = make_settings(database, prefix, STREAMSVC_STATEMENT_TIMEOUT_MS="400")
    await conn.execute("INSERT INTO counters VALUES ('slow', 0), ('a', 0), ('b', 0)")
    await slow_counter(conn, "slow")
    async with running(settings) as service:
        await service.ingress.submit(ops([bump("slow")]), caller=ANONYMOUS, source="api")
        await service.ingress.submit(
            ops([bump("a"), bump("b"), bump("a")]), caller=ANONYMOUS, source="api"
        )
        work = service.streams.names.work
        a, b = service.flushers
        await service.streams.ensure_group(work, rs.FLUSHER_GROUP)
        slow = await service.streams.read(work, rs.FLUSHER_GROUP, a.name, count=1, block_ms=None)
        waiting = await service.streams.read(work, rs.FLUSHER_GROUP, b.name, count=1, block_ms=None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.handle, [(work, e) for e in slow])

            async def table_locked() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    )
                )

            await eventually(table_locked, every=0.005)
            tg.start_soon(b.handle, [(work, e) for e in waiting])
    rows = await conn.fetch(
        """SELECT body->'params'->>0 AS name, status, error, attempts FROM "BatchOperations"
           ORDER BY name"""
    )
    by_name = {r["name"]: r for r in rows if r["name"] != "a"}
    assert by_name["slow"]["status"] == "FAIL"
    assert by_name["slow"]["error"].startswith("statement timeout: ")
    assert [(r["status"], r["attempts"]) for r in rows if r["name"] != "slow"] == [
        ("SUCCESS", 1)
    ] * 3
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'a'") == 2


async def slow_counter(conn: asyncpg.Connection, name: str) -> None:
    """Every update of counter ``name`` runs until the statement timeout stops it."""
    await conn.execute(f"""
        CREATE FUNCTION slowly() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$;
        CREATE TRIGGER slowly BEFORE UPDATE ON counters FOR EACH ROW
            WHEN (NEW.name = '{name}') EXECUTE FUNCTION slowly();
    """)


async def test_a_statement_that_keeps_timing_out_fails_alone_and_its_batch_lands(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """The batch is retried once, then cut in halves, each its own transaction, until the
    slow operation stands alone: it ends FAIL ("statement timeout"), every other
    operation of the batch succeeds, in order."""
    settings = make_settings(database, prefix, STREAMSVC_STATEMENT_TIMEOUT_MS="300")
    await conn.execute("INSERT INTO counters VALUES ('slow', 0), ('free', 0)")
    await slow_counter(conn, "slow")
    batch = [order(1), bump("free"), order(2), bump("free"), bump("slow"), order(3)]
    batch += [bump("free"), order(4), order(3)]
    async with running(settings) as service:
        results = await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        started = time.monotonic()
        await drain(service)
        took = time.monotonic() - started
    by_id = {
        str(r[0]): (r[1], r[2])
        for r in await conn.fetch('SELECT id, status, error FROM "BatchOperations"')
    }
    outcome = [by_id[r.id] for r in results if isinstance(r, Receipt)]
    assert outcome[4][0] == "FAIL"
    assert outcome[4][1].startswith("statement timeout: canceling statement due to statement")
    assert outcome[8][0] == "FAIL"  # a repeated key: found in its own half, as usual
    assert "duplicate key value" in outcome[8][1]
    assert [s for s, _ in outcome[:4] + outcome[5:8]] == ["SUCCESS"] * 7
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'free'") == 3
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'slow'") == 0
    assert await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM orders") == [1, 2, 3, 4]
    # two tries of the whole batch, then one timeout per halving: 9 -> 5 -> 2 -> 1
    assert took < 0.3 * (2 + 4) + 5


@pytest.mark.parametrize("catalog_knows", [True, False], ids=["catalog-refreshed", "stale"])
async def test_a_column_dropped_before_the_flush_fails_only_its_operations(
    settings: Settings, conn: asyncpg.Connection, catalog_knows: bool
) -> None:
    """Validated against a column that is gone by the flush: those operations FAIL, found
    while rendering (the catalog knows already) or by PostgreSQL (it does not yet); the
    rest of the batch, before and after them, lands in the same transaction."""
    await conn.execute("ALTER TABLE orders ADD COLUMN region text")
    with_region = [
        {**order(i), "values": {"id": i, "customer": "c", "amount": 1, "region": "eu"}}
        for i in (2, 4)
    ]
    bump: dict[str, object] = {
        "operationType": "BUMP",
        "sql": "UPDATE orders SET note = 'x' WHERE id = $1",
    }
    batch = [order(1), with_region[0], {**bump, "params": [1]}, order(3), with_region[1]]
    async with running(settings) as service:
        await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await conn.execute("ALTER TABLE orders DROP COLUMN region")
        if catalog_knows:
            service.catalog.min_refresh_s = 0
            assert await service.catalog.refresh(conn)
        await drain(service)
    rows = await conn.fetch(
        """SELECT (body->'values'->>'id')::int, status, error, batch_id FROM "BatchOperations"
           WHERE body ? 'values'"""
    )
    failed = {r[0]: r[2] for r in rows if r[1] == "FAIL"}
    assert set(failed) == {2, 4}
    assert all('column "region" of relation "orders" does not exist' in e for e in failed.values())
    assert await statuses(conn) == {"SUCCESS": 3, "FAIL": 2}
    assert len({r[3] for r in rows}) == 1, "one batch"
    assert await conn.fetchval("SELECT note FROM orders WHERE id = 1") == "x"
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2


async def test_a_claim_finds_its_rows_by_primary_key_however_many_are_pending(
    conn: asyncpg.Connection,
) -> None:
    """A backlog of pending rows must not make each claim scan all of them (the pending
    rows' partial index) or the whole table: the plan PostgreSQL runs, as auto_explain
    reports it, looks the batch's rows up by primary key."""
    ids = [uuid.uuid4() for _ in range(5000)]
    await conn.executemany(
        """INSERT INTO "BatchOperations" (id, operation_type, body, source, submitted_by)
           VALUES ($1, 'T', '{}', 'api', 'caller')""",
        [(i,) for i in ids],
    )
    await postgres.create_flush_functions(conn)
    plans: list[str] = []
    conn.add_log_listener(lambda _, message: plans.append(str(message)))
    await conn.execute(
        """LOAD 'auto_explain';
           SET auto_explain.log_min_duration = 0;
           SET auto_explain.log_nested_statements = on;
           SET auto_explain.log_level = notice"""
    )
    async with conn.transaction():
        claimed = await conn.fetch(
            "SELECT * FROM pg_temp.streamsvc_claim($1::uuid[], $2::uuid)", ids[:100], uuid.uuid4()
        )
    await conn.execute("RESET auto_explain.log_min_duration")
    assert len(claimed) == 100
    (plan,) = [p for p in plans if 'UPDATE "BatchOperations"' in p]
    assert "BatchOperations_pkey" in plan, plan
    assert "pending_idx" not in plan and "Seq Scan" not in plan, plan


async def test_a_batch_holding_an_operation_finished_earlier_applies_the_rest_once(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """A redelivered batch whose first operation already succeeded: the one-statement
    batch finds it finished and undoes everything; the batch goes again as a transaction
    of several calls, applying the other two once and reporting the first as it ended."""
    async with running(settings) as service:
        three = ops([order(n) for n in (1, 2, 3)])
        results = await service.ingress.submit(three, caller=ANONYMOUS, source="api")
        ids = [r.id for r in results if isinstance(r, Receipt)]
        await conn.execute(
            """UPDATE "BatchOperations" SET status = 'SUCCESS', attempts = 1
               WHERE id = $1::uuid""",
            ids[0],
        )
        items = [WorkOp(op_id, op) for op_id, op in zip(ids, three, strict=True)]
        applied = await service.ingress.store.apply(items)
    assert sorted(o.id for o in applied.outcomes) == sorted(ids[1:])
    assert [(o.id, o.status) for o in applied.earlier] == [(ids[0], Status.SUCCESS)]
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2, "the first was not applied"
