"""`python -m benchmarks.plans`: the plans of every list shape and count on a table of
millions of operations, for docs/queries.md.

Makes a scratch database (dropped afterwards unless --keep), migrates it, fills
BatchOperations like a busy service's (tests.support.plans.FILL: 30 days, 20
operationTypes, 50 callers, mostly SUCCESS), VACUUM ANALYZEs, then prints EXPLAIN
(ANALYZE, BUFFERS) of each list shape at its first page and at a cursor 90% of the way
down, of each count over the last hour and the last day, and of the throughput; and a
table of the execution times (the best of three runs, warm).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import uuid
from typing import Any

import anyio
import asyncpg

from benchmarks.harness import PG
from streamsvc.adapters import postgres
from streamsvc.store.queries import QUERIES
from tests.support import plans


async def explain(conn: asyncpg.Connection, sql: str, args: list[Any]) -> tuple[str, float]:
    """The plan, trimmed of its Index Cond lines, and its best execution time of three."""
    best = float("inf")
    text = ""
    for _ in range(3):
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        lines = [r[0] for r in rows]
        took = float(lines[-1].split(":")[1].split()[0])  # "Execution Time: 0.123 ms"
        if took < best:
            best, text = took, "\n".join(line for line in lines if "Cond:" not in line)
    return text, best


async def main(rows: int, keep: bool) -> None:
    name = f"streamsvc_plans_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database="postgres", **PG)
    await admin.execute(f'CREATE DATABASE "{name}"')
    times: list[tuple[str, str, float]] = []
    try:
        conn = await asyncpg.connect(database=name, **PG)
        try:
            await postgres.migrate(conn)
            started = time.perf_counter()
            await plans.fill(conn, rows)
            print(f"-- filled {rows:,} rows in {time.perf_counter() - started:.0f} s\n")
            for shape in plans.SHAPES:
                deep = await plans.deep_position(conn, shape)
                for where, after in (("first page", None), ("90% down", deep)):
                    sql, args = plans.list_statement(shape, after)
                    text, took = await explain(conn, sql, args)
                    times.append((shape.name, where, took))
                    print(f"## {shape.name}, {where}\n{text}\n")
            now = dt.datetime.now(dt.UTC)
            for query, mine, _ in plans.COUNTS:
                for label, span in (
                    ("1 hour", dt.timedelta(hours=1)),
                    ("1 day", dt.timedelta(days=1)),
                ):
                    owner = plans.RARE_CALLER if mine else None
                    sql, args = plans.count_statement(query, owner, now - span, now)
                    text, took = await explain(conn, sql, args)
                    times.append((query, label, took))
                    print(f"## {query}, {label}\n{text}\n")
            text, took = await explain(conn, QUERIES["throughput"], [60])
            times.append(("throughput", "60 minutes", took))
            print(f"## throughput, 60 minutes\n{text}\n")
        finally:
            await conn.close()
    finally:
        if not keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print("| query | where | ms |\n| --- | --- | ---: |")
    for what, where, took in times:
        print(f"| {what} | {where} | {took:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plans", description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000, help="operations in the table")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    anyio.run(main, args.rows, args.keep)
