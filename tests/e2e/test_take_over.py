"""Take-over in seconds (actors.heartbeat, Sweeper.take_over) with `streamsvc run`
processes: a killed process's work is finished by the others within 5 s, although its
entries would count as abandoned only after STREAMSVC_CLAIM_IDLE_MS (60 s here); a live
flusher stuck in a long batch is never robbed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import asyncpg
import pytest
import redis.asyncio as aioredis

from benchmarks import workload
from benchmarks.harness import ServiceProcess, produce, start_together
from streamsvc.adapters import streams as rs
from streamsvc.model import work_decoder
from tests.conftest import settings_env
from tests.pipeline import eventually, order, statuses

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

IDLE_MS = "60000"  # the idle rule alone would wait this long


@pytest.fixture
def processes(database: str, prefix: str, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []

    def make(role: str) -> ServiceProcess:
        env = settings_env(
            database,
            prefix,
            STREAMSVC_CLAIM_IDLE_MS=IDLE_MS,
            BATCH_PROCESS_OPERATION_LIMIT="500",
        )
        workdir = tmp_path / f"{role}-{len(started)}"
        workdir.mkdir()
        process = ServiceProcess(env, workdir)
        process.role = role  # type: ignore[attr-defined]
        started.append(process)
        return process

    yield [make(role) for role in ("all", "all", "all")]
    for process in started:
        process.stop()


async def held_by(redis: aioredis.Redis, names: rs.Names, pid: int) -> dict[bytes, list[str]]:
    """The operations of each work entry the flushers of process ``pid`` hold, by entry."""
    streams = rs.Streams(redis, names)
    held: dict[bytes, list[str]] = {}
    for stream in names.work_streams:
        for name, pending, _ in await streams.consumers(stream, rs.FLUSHER_GROUP):
            if f"-{pid}-" not in name or not pending:
                continue
            entries = await streams.idle_pending(
                stream, rs.FLUSHER_GROUP, min_idle_ms=0, count=1000, consumer=name
            )
            for entry_id, _ in entries:
                found = cast(list[rs.Entry], await redis.xrange(stream, entry_id, entry_id))
                for found_id, fields in found:
                    held[found_id] = [op.id for op in work_decoder.decode(fields[b"ops"])]
    return held


async def test_a_killed_process_s_work_is_finished_by_the_others_within_5_s(
    processes: list[ServiceProcess],
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    prefix: str,
) -> None:
    w = workload.build(30_000, seed=21)
    await workload.seed(conn, w)
    await start_together([process.start for process in processes])
    names = rs.Names(prefix)
    await produce(redis, names.inbox, w.ops)
    victim = processes[0]
    assert victim.proc is not None
    held: dict[bytes, list[str]] = {}

    async def victim_holds_work() -> bool:
        nonlocal held
        held = await held_by(redis, names, victim.proc.pid)  # type: ignore[union-attr]
        return sum(map(len, held.values())) >= 200  # mid-batch, with work to lose

    await eventually(victim_holds_work, within=60, every=0.005)
    victim.kill()
    killed = time.monotonic()
    ids = [op_id for ops in held.values() for op_id in ops]

    async def finished_by_others() -> bool:
        done = await conn.fetchval(
            """SELECT count(*) FROM "BatchOperations"
               WHERE id = ANY($1::uuid[]) AND status IN ('SUCCESS', 'FAIL')""",
            ids,
        )
        return bool(done == len(ids))

    await eventually(finished_by_others, within=30, every=0.05)
    took = time.monotonic() - killed
    print(f"take-over: {len(ids)} operations held by the killed process, done in {took:.2f} s")
    assert took < 5, f"the dead process's {len(ids)} operations took {took:.1f} s"
    expected = workload.expected_statuses(w)

    async def all_finished() -> bool:
        return await statuses(conn) == expected

    await eventually(all_finished, within=90)
    await workload.verify(conn, w)
    for stream in names.work_streams:
        consumers = await redis.xinfo_consumers(stream, rs.FLUSHER_GROUP)
        dead = [c["name"] for c in consumers if f"-{victim.proc.pid}-".encode() in c["name"]]
        assert not dead, "the dead process's consumers are removed from the group"
    for process in processes[1:]:
        assert await process.terminate() == 0


async def test_a_live_flusher_stuck_in_a_long_batch_is_never_robbed(
    processes: list[ServiceProcess],
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    prefix: str,
    database: str,
) -> None:
    await workload.seed(conn, workload.build(0))
    one = processes[0]
    locker = await asyncpg.connect(database=database, **_pg())
    try:
        await one.start()
        names = rs.Names(prefix)
        async with locker.transaction():
            await locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            await produce(redis, names.inbox, [order(1)])
            assert one.proc is not None
            pid = one.proc.pid

            async def taken() -> bool:
                return bool(await held_by(redis, names, pid))

            await eventually(taken, within=30)
            first = await held_by(redis, names, pid)
            deadline = time.monotonic() + 4  # eight heartbeats, two key lifetimes
            while time.monotonic() < deadline:
                assert await held_by(redis, names, pid) == first, "a live flusher was robbed"
                await _sleep(0.2)
            pending = await redis.xpending(names.work, rs.FLUSHER_GROUP)
            assert pending["pending"] == 1, "nobody put the entry back on the stream"
        await eventually(lambda: _applied(conn), within=30)
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE id = 1") == 1
        assert await conn.fetchval('SELECT attempts FROM "BatchOperations"') == 1
        assert await one.terminate() == 0
    finally:
        await locker.close()


def _pg() -> dict[str, object]:
    from benchmarks.harness import PG

    return dict(PG)


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def _applied(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT bool_and(status = 'SUCCESS') FROM \"BatchOperations\""))
