"""`just bench`: streamsvc end to end through each ingress, side by side, in one run.

Each scenario gets a fresh database with the workload's tables and a fresh `streamsvc run`
child process. Time runs from the first submission until every operation is finished
(SUCCESS, or FAIL for poison) in BatchOperations and its row checked in its table.
Figures are printed, and written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from benchmarks import scenarios, workload
from benchmarks.harness import PG, REDIS_URL, RMQ_URL, ServiceProcess, free_port
from streamsvc.adapters import postgres
from streamsvc.adapters import streams as rs

RESULTS = Path(__file__).parent / "results"
SCENARIOS = ("inbox", "rpc-single", "rpc-bulk")
PENDING_LEFT = """SELECT EXISTS (SELECT 1 FROM "BatchOperations"
                  WHERE status IN ('UNPROCESSED', 'PROCESSING'))"""


@dataclass
class Stage:
    """A fresh database, Redis prefix and queue, and the service running on them."""

    name: str
    prefix: str
    conn: asyncpg.Connection
    redis: Any
    services: list[ServiceProcess]

    @property
    def inbox(self) -> str:
        return rs.Names(self.prefix).inbox

    @property
    def queue(self) -> str:
        return f"{self.prefix}-rpc"


@asynccontextmanager
async def stage(
    w: workload.Workload, flushers: int, limit: int, roles: list[str]
) -> AsyncIterator[Stage]:
    name = f"streamsvc_bench_{uuid.uuid4().hex[:8]}"
    prefix = f"streamsvc-bench-{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database="postgres", **PG)
    await admin.execute(f'CREATE DATABASE "{name}"')
    redis = rs.connect(REDIS_URL)
    conn = await asyncpg.connect(database=name, **PG)
    services: list[ServiceProcess] = []
    try:
        await conn.execute(workload.SCHEMA)
        await postgres.migrate(conn)
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
            "BATCH_SERVICE_RMQ_QUEUE": f"{prefix}-rpc",
            "STREAMSVC_EVENTS_EXCHANGE": f"{prefix}-events",
        }
        for role in roles:  # one process each: `all`, or a split such as ingress + flusher
            service = ServiceProcess(
                {**env, "STREAMSVC_HTTP_PORT": str(free_port())},
                Path(tempfile.mkdtemp(prefix="streamsvc-bench-")),
            )
            services.append(service)
            await service.start("--role", role)
        yield Stage(name, prefix, conn, redis, services)
    finally:
        for service in services:
            await service.terminate()
        await conn.close()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        await _drop_rabbitmq(prefix)


async def _drop_rabbitmq(prefix: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{prefix}-rpc")
        await channel.exchange_delete(f"{prefix}-events")


async def finished(st: Stage, *, inbox: bool) -> None:
    """Cheap to ask: nothing left in the inbox (entries are acked only once stored) and no
    stored operation pending (a partial index answers that)."""
    while True:
        empty = not inbox or not await st.redis.xlen(st.inbox)
        if empty and not await st.conn.fetchval(PENDING_LEFT):
            return
        await anyio.sleep(0.01)


async def run_scenario(
    name: str, n: int, flushers: int, limit: int, roles: list[str] | None = None
) -> dict[str, Any]:
    w = workload.build(n)
    async with stage(w, flushers, limit, roles or ["all"]) as st:
        submit: Callable[[], Awaitable[None]]
        if name == "inbox":

            async def submit() -> None:
                await scenarios.inbox(st.redis, st.inbox, w.ops)
        else:

            async def submit() -> None:
                async with scenarios.rpc_client(RMQ_URL, st.queue) as client:
                    if name == "rpc-single":
                        await scenarios.rpc_single(client, w.ops)
                    else:
                        await scenarios.rpc_bulk(client, w.ops)

        started = time.perf_counter()
        await submit()
        submitted = time.perf_counter() - started
        await finished(st, inbox=name == "inbox")
        elapsed = time.perf_counter() - started
        await workload.verify(st.conn, w)
        await workload.verify_statuses(st.conn, w)
        batches = await st.conn.fetchval(
            "SELECT count(DISTINCT batch_id) FROM \"BatchOperations\" WHERE status = 'SUCCESS'"
        )
        return {
            "scenario": name,
            "operations": n,
            "seconds": round(elapsed, 3),
            "ops_per_s": round(n / elapsed),
            "submit_seconds": round(submitted, 3),
            "batches": batches,
            "mean_batch": round(n / max(1, batches), 1),
        }


async def run_all(
    names: list[str], n: int, flushers: int, limit: int, roles: list[str]
) -> list[dict[str, Any]]:
    results = []
    for name in names:
        print(f"running {name} with {n} operations ({'+'.join(roles)}) ...", flush=True)
        results.append(await run_scenario(name, n, flushers, limit, roles))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--n", type=int, default=50_000, help="operations per scenario")
    parser.add_argument("--flushers", type=int, default=2, help="STREAMSVC_FLUSHERS")
    parser.add_argument("--limit", type=int, default=1000, help="BATCH_PROCESS_OPERATION_LIMIT")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run just these")
    parser.add_argument(
        "--roles",
        default="all",
        help="service processes, one per role: `all`, or e.g. `ingress,flusher,notifier,sweeper`",
    )
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    roles = args.roles.split(",")
    names = args.only or list(SCENARIOS)
    results = anyio.run(run_all, names, args.n, args.flushers, args.limit, roles)
    print(f"\n{'scenario':<12} {'ops':>8} {'seconds':>8} {'ops/s':>8} {'mean batch':>11}")
    for r in results:
        print(
            f"{r['scenario']:<12} {r['operations']:>8} {r['seconds']:>8} {r['ops_per_s']:>8} "
            f"{r['mean_batch']:>11}"
        )
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
        meta = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "flushers": args.flushers,
            "limit": args.limit,
            "roles": roles,
        }
        path.write_text(json.dumps({"machine": meta, "results": results}, indent=2) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
