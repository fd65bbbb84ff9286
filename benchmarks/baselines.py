"""What streamsvc's figures are compared with: the same workload, servers and checks.

Every figure runs in a fresh database, times only the work (setup and verification are
outside the clock), and is checked afterwards with `workload.verify`: each effect landed
exactly once and no poisoned operation left a trace.

- naive (baseline): what a service without batching does. Every operation is its own
  transaction (one plain statement, committed on its own) from a pool of 16 connections,
  16 at a time. A poisoned operation fails alone.
- pgqueuer (baseline): the job queue a team would pick instead. One job per operation,
  enqueued in one batch, worked off by pgqueuer with 16 at a time; each job applies its
  operation exactly as naive does. Time runs from the enqueue until the queue is drained.
- copy (ceiling): the fastest PostgreSQL lands the same effects. Per chunk of 10,000
  operations one transaction: COPY for the inserts, one set-based statement each for the
  updates, deletes, upserts and counter increments. Poison is left out: a ceiling assumes
  clean data.
- copy+update (ceiling): copy plus the bookkeeping streamsvc cannot skip. Per chunk, a
  transaction COPYs every operation into "BatchOperations"; then the effect transaction
  of copy also marks those rows SUCCESS (FAIL for poison) in the same commit, with
  streamsvc's own statements.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import msgspec
from pgqueuer import Job, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode

from benchmarks import workload
from benchmarks.harness import PG
from streamsvc.adapters import postgres
from streamsvc.allowlist import quote_ident
from streamsvc.store.queries import QUERIES

# What a team's code knows of its own schema: JSON carries these as ISO 8601 text.
TIMESTAMP_COLUMNS = frozenset({"created_at", "paid_at"})

SET_NOTES = """
UPDATE orders AS o SET note = u.note
FROM unnest($1::integer[], $2::text[]) AS u(id, note) WHERE o.id = u.id
"""
DELETE_ORDERS = "DELETE FROM orders WHERE id = ANY($1::integer[])"
UPSERT_COUNTERS = """
INSERT INTO counters (name, value) SELECT * FROM unnest($1::text[], $2::integer[])
ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value
"""
BUMP_COUNTERS = """
UPDATE counters AS c SET value = c.value + u.n
FROM unnest($1::text[], $2::integer[]) AS u(name, n) WHERE c.name = u.name
"""
# streamsvc's own record: the columns it writes on intake (it ends a batch with its own
# statements, sql/queries.sql: claim_batch and mark_failed).
INTAKE_COLUMNS = ("id", "operation_type", "body", "source", "submitted_by")
POISON_ERROR = 'new row for relation "orders" violates check constraint "orders_amount_check"'


@asynccontextmanager
async def fresh_database(
    w: workload.Workload, *, migrate: bool = True
) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A new database with the workload's tables (and streamsvc's, when ``migrate``),
    seeded; yields its name and a connection, and drops it on exit."""
    name = f"streamsvc_bench_{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        admin = await asyncpg.connect(database="postgres", **PG)
        stack.push_async_callback(admin.close)
        await admin.execute(f'CREATE DATABASE "{name}"')
        stack.push_async_callback(admin.execute, f'DROP DATABASE "{name}" WITH (FORCE)')
        conn = await asyncpg.connect(database=name, **PG)
        stack.push_async_callback(conn.close)
        await conn.execute(workload.SCHEMA)
        if migrate:
            await postgres.migrate(conn)
        await workload.seed(conn, w)
        yield name, conn


def statement(op: dict[str, Any]) -> tuple[str, list[Any]]:
    """One operation as one plain statement: identifiers quoted, values as parameters."""
    if "sql" in op:
        return op["sql"], list(op.get("params") or ())
    table = quote_ident(op["table"])
    values, key = op.get("values") or {}, op.get("key") or {}
    args = [_param(c, v) for c, v in [*values.items(), *key.items()]]
    sets = [f"{quote_ident(c)} = ${i}" for i, c in enumerate(values, start=1)]
    where = " AND ".join(f"{quote_ident(c)} = ${i}" for i, c in enumerate(key, len(values) + 1))
    columns = ", ".join(quote_ident(c) for c in [*values, *key])
    marks = ", ".join(f"${i}" for i in range(1, len(args) + 1))
    match op["action"]:
        case "insert":
            return f"INSERT INTO {table} ({columns}) VALUES ({marks})", args
        case "update":
            return f"UPDATE {table} SET {', '.join(sets)} WHERE {where}", args
        case "delete":
            return f"DELETE FROM {table} WHERE {where}", args
        case "upsert":
            target = ", ".join(quote_ident(c) for c in key)
            taken = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in values)
            return (
                f"INSERT INTO {table} ({columns}) VALUES ({marks}) "
                f"ON CONFLICT ({target}) DO UPDATE SET {taken}"
            ), args
    raise ValueError(f"unknown action {op['action']!r}")


def _param(column: str, value: Any) -> Any:
    """A JSON value as asyncpg binds it (numbers and numeric text bind to numeric as is)."""
    if column in TIMESTAMP_COLUMNS and isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


async def apply(conn: asyncpg.Connection, op: dict[str, Any]) -> None:
    """Apply one operation in its own transaction: one statement, committed on its own."""
    sql, args = statement(op)
    await conn.execute(sql, *args)


async def naive(w: workload.Workload, *, pool_size: int = 16) -> dict[str, Any]:
    failed = 0
    async with (
        fresh_database(w, migrate=False) as (name, conn),
        asyncpg.create_pool(database=name, min_size=pool_size, max_size=pool_size, **PG) as pool,
    ):
        pending = iter(w.ops)  # shared: each worker takes the next operation not yet taken

        async def worker() -> None:
            nonlocal failed
            async with pool.acquire() as own:
                for op in pending:
                    try:
                        await apply(own, op)
                    except asyncpg.IntegrityConstraintViolationError:
                        failed += 1  # poison: refused by a constraint, alone

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(pool_size):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - started
        await workload.verify(conn, w)
    assert failed == len(w.poisoned), (failed, len(w.poisoned))
    return _result("naive", "baseline", w, elapsed)


async def peer(w: workload.Workload, *, workers: int = 16) -> dict[str, Any]:
    n = len(w.ops)
    async with (
        fresh_database(w, migrate=False) as (name, conn),
        asyncpg.create_pool(database=name, min_size=workers, max_size=workers, **PG) as pool,
        asyncpg.create_pool(database=name, min_size=2, max_size=4, **PG) as queue_pool,
    ):
        queries = Queries.from_asyncpg_pool(queue_pool)
        await queries.install()
        manager = QueueManager(queries)

        @manager.entrypoint("apply")
        async def apply_job(job: Job) -> None:  # a constraint error fails the job: "exception"
            assert job.payload is not None
            async with pool.acquire() as own:
                await apply(own, msgspec.json.decode(job.payload))

        started = time.perf_counter()
        payloads: list[bytes | None] = [msgspec.json.encode(op) for op in w.ops]
        await queries.enqueue(["apply"] * n, payloads, [0] * n)
        await manager.run(
            batch_size=workers // 2,  # pgqueuer wants at least two batches in flight
            max_concurrent_tasks=workers,
            mode=QueueExecutionMode.drain,  # return once the queue is empty and idle
        )
        elapsed = time.perf_counter() - started
        await workload.verify(conn, w)
        ended = await conn.fetch("SELECT status::text, count(*) FROM pgqueuer_log GROUP BY 1")
    counts = {r[0]: r[1] for r in ended if r[0] in ("successful", "exception")}
    expected = {"successful": n - len(w.poisoned), "exception": len(w.poisoned)}
    assert counts == {k: v for k, v in expected.items() if v}, counts
    return _result("pgqueuer", "baseline", w, elapsed)


async def copy_ceiling(w: workload.Workload, *, chunk: int = 10_000) -> dict[str, Any]:
    async with fresh_database(w, migrate=False) as (_, conn):
        started = time.perf_counter()
        for ops, poisoned in _chunks(w, chunk):
            async with conn.transaction():
                await _land(conn, _clean(ops, poisoned))
        elapsed = time.perf_counter() - started
        await workload.verify(conn, w)
    return _result("copy", "ceiling", w, elapsed)


async def copy_update_ceiling(w: workload.Workload, *, chunk: int = 10_000) -> dict[str, Any]:
    async with fresh_database(w) as (_, conn):
        await postgres.create_flush_functions(conn)  # what CLAIM_BATCH and MARK_FAILED call
        started = time.perf_counter()
        for ops, poisoned in _chunks(w, chunk):
            ids = [uuid.uuid4() for _ in ops]
            intake = [
                (id_, op["operationType"], msgspec.json.encode(op).decode(), "bench", "bench")
                for id_, op in zip(ids, ops, strict=True)
            ]
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "BatchOperations", records=intake, columns=INTAKE_COLUMNS
                )
            failed = [id_ for id_, bad in zip(ids, poisoned, strict=True) if bad]
            async with conn.transaction():
                await conn.execute(QUERIES["claim_batch"], ids, uuid.uuid4())
                await _land(conn, _clean(ops, poisoned))
                await conn.execute(QUERIES["mark_failed"], failed, [POISON_ERROR] * len(failed))
        elapsed = time.perf_counter() - started
        await workload.verify(conn, w)
        await workload.verify_statuses(conn, w)
    return _result("copy+update", "ceiling", w, elapsed)


def _chunks(w: workload.Workload, size: int) -> Iterator[tuple[list[dict[str, Any]], list[bool]]]:
    """The operations ``size`` at a time, with whether each is poison."""
    poison = set(w.poisoned)  # indexes into w.ops
    for start in range(0, len(w.ops), size):
        ops = w.ops[start : start + size]
        yield ops, [start + i in poison for i in range(len(ops))]


def _clean(ops: list[dict[str, Any]], poisoned: list[bool]) -> list[dict[str, Any]]:
    return [op for op, bad in zip(ops, poisoned, strict=True) if not bad]


@dataclass
class Effects:
    """A chunk's operations sorted into the set-based statements that apply them. The
    workload never touches one row twice, so the statements' order does not matter."""

    inserts: dict[tuple[str, tuple[str, ...]], list[tuple[Any, ...]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    notes: dict[int, str] = field(default_factory=dict)
    deleted: list[int] = field(default_factory=list)
    upserts: dict[str, int] = field(default_factory=dict)
    bumps: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @classmethod
    def of(cls, ops: list[dict[str, Any]]) -> Effects:
        e = cls()
        for op in ops:
            match op:
                case {"sql": workload.INCREMENT_SQL, "params": [name]}:
                    e.bumps[name] += 1
                case {"action": "insert", "table": table, "values": values}:
                    row = tuple(_param(c, v) for c, v in values.items())
                    e.inserts[table, tuple(values)].append(row)
                case {"table": "orders", "action": "update", "values": {"note": note}}:
                    e.notes[op["key"]["id"]] = note
                case {"table": "orders", "action": "delete", "key": {"id": id_}}:
                    e.deleted.append(id_)
                case {"table": "counters", "action": "upsert", "values": {"value": value}}:
                    e.upserts[op["key"]["name"]] = value
                case _:
                    raise ValueError(f"no set-based statement for {op!r}")
        return e


async def _land(conn: asyncpg.Connection, ops: list[dict[str, Any]]) -> None:
    """Apply ``ops`` set-based, inside the caller's transaction."""
    e = Effects.of(ops)
    for (table, columns), rows in e.inserts.items():
        await conn.copy_records_to_table(table, records=rows, columns=columns)
    await conn.execute(SET_NOTES, list(e.notes), list(e.notes.values()))
    await conn.execute(DELETE_ORDERS, e.deleted)
    await conn.execute(UPSERT_COUNTERS, list(e.upserts), list(e.upserts.values()))
    await conn.execute(BUMP_COUNTERS, list(e.bumps), list(e.bumps.values()))


def _result(scenario: str, kind: str, w: workload.Workload, elapsed: float) -> dict[str, Any]:
    n = len(w.ops)
    return {
        "scenario": scenario,
        "kind": kind,
        "operations": n,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(n / elapsed),
    }
