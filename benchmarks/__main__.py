"""`just bench`: streamsvc end to end through the Redis inbox, on the local servers.

Each run makes a fresh database with the workload's tables, starts `streamsvc run` as a
child process, XADDs N mixed operations to the inbox, and times from the first XADD until
every operation is SUCCESS (or FAIL, for the poison ones) in BatchOperations. Figures are
printed and written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from benchmarks import workload
from benchmarks.harness import ServiceProcess, produce
from streamsvc.adapters import postgres
from streamsvc.adapters import streams as rs

RESULTS = Path(__file__).parent / "results"
PG = {
    "host": os.environ.get("DB_HOST", "127.0.0.1"),
    "port": int(os.environ.get("DB_PORT", 5432)),
    "user": os.environ.get("DB_USERNAME", "postgres"),
}


async def inbox_run(n: int, flushers: int, limit: int) -> dict[str, Any]:
    name = f"streamsvc_bench_{uuid.uuid4().hex[:8]}"
    prefix = f"streamsvc-bench-{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database="postgres", **PG)
    await admin.execute(f'CREATE DATABASE "{name}"')
    client = rs.connect(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    conn = await asyncpg.connect(database=name, **PG)
    service: ServiceProcess | None = None
    try:
        await conn.execute(workload.SCHEMA)
        await postgres.migrate(conn)
        w = workload.build(n)
        await workload.seed(conn, w)
        env = {
            "DB_HOST": PG["host"],
            "DB_PORT": str(PG["port"]),
            "DB_USERNAME": PG["user"],
            "DB_NAME": name,
            "STREAMSVC_REDIS_PREFIX": prefix,
            "STREAMSVC_AUTH": "off",
            "STREAMSVC_ALLOWED_TABLES": workload.ALLOWED,
            "STREAMSVC_FLUSHERS": str(flushers),
            "BATCH_PROCESS_OPERATION_LIMIT": str(limit),
        }
        service = ServiceProcess(env, Path(tempfile.mkdtemp(prefix="streamsvc-bench-")))
        await service.start()
        started = time.perf_counter()
        await produce(client, rs.Names(prefix).inbox, w.ops)
        produced = time.perf_counter() - started
        await finished(client, conn, rs.Names(prefix).inbox)
        elapsed = time.perf_counter() - started
        await workload.verify(conn, w)
        batches = await conn.fetchval(
            "SELECT count(DISTINCT batch_id) FROM \"BatchOperations\" WHERE status = 'SUCCESS'"
        )
        return {
            "scenario": "inbox end to end",
            "operations": n,
            "flushers": flushers,
            "limit": limit,
            "seconds": round(elapsed, 3),
            "ops_per_s": round(n / elapsed),
            "produce_seconds": round(produced, 3),
            "batches": batches,
            "mean_batch": round(n / max(1, batches), 1),
        }
    finally:
        if service is not None:
            await service.terminate()
        await conn.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def finished(client: Any, conn: asyncpg.Connection, inbox: str) -> None:
    """Cheap to ask: the inbox is empty (so every operation is stored, as entries are
    acked only once stored) and no stored operation is pending (partial index)."""
    while True:
        if not await client.xlen(inbox) and not await conn.fetchval(PENDING_LEFT):
            return
        await anyio.sleep(0.01)


PENDING_LEFT = """SELECT EXISTS (SELECT 1 FROM "BatchOperations"
                  WHERE status IN ('UNPROCESSED', 'PROCESSING'))"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="operations per run")
    parser.add_argument("--flushers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=1000, help="BATCH_PROCESS_OPERATION_LIMIT")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    result = anyio.run(inbox_run, args.n, args.flushers, args.limit)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    for key, value in result.items():
        print(f"{key:>16}: {value}")
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"inbox-{time.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'saved':>16}: {path}")


if __name__ == "__main__":
    main()
