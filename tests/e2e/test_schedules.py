"""Recurring operations (STREAMSVC_SCHEDULES) with two `streamsvc run` processes."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from benchmarks.harness import ServiceProcess, free_port, start_together
from tests.conftest import settings_env
from tests.pipeline import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BEAT = {
    "operationType": "BEAT",
    "sql": "UPDATE counters SET value = value + 1 WHERE name = $1",
    "params": ["beat"],
}
SCHEDULES = json.dumps({"beat": {"cron": "*/1 * * * * *", "operation": BEAT}})
SECOND = dt.timedelta(seconds=1)


@pytest.fixture
def env(database: str, prefix: str) -> dict[str, str]:
    return settings_env(database, prefix, STREAMSVC_SCHEDULES=SCHEDULES)


@pytest.fixture
def processes(env: dict[str, str], tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Two processes on one database and Redis prefix, each with its own HTTP port."""
    started = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        port = str(free_port())
        started.append(ServiceProcess({**env, "STREAMSVC_HTTP_PORT": port}, tmp_path / name))
    yield started
    for process in started:
        process.stop()


async def ticks(conn: asyncpg.Connection) -> list[tuple[dt.datetime, int]]:
    """(runAt, rows) of every tick stored, in order."""
    rows = await conn.fetch(
        'SELECT run_at, count(*) FROM "BatchOperations" WHERE source = $1 '
        "GROUP BY run_at ORDER BY run_at",
        "schedule",
    )
    return [(r[0], r[1]) for r in rows]


async def stored_after(conn: asyncpg.Connection, after: dt.datetime, n: int) -> None:
    async def enough() -> bool:
        return sum(run_at > after for run_at, _ in await ticks(conn)) >= n

    await eventually(enough, within=20, every=0.1)


async def received(process: ServiceProcess) -> float:
    """The schedule submissions the process's ingress took (stored, or stored before)."""
    port = process.env["STREAMSVC_HTTP_PORT"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    found = re.search(
        r'^streamsvc_operations_received_total\{source="schedule"\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


async def stop(*processes: ServiceProcess) -> None:
    for process in processes:
        assert await process.terminate() == 0


async def test_two_processes_store_each_tick_once_and_status_lists_the_schedule(
    processes: list[ServiceProcess], conn: asyncpg.Connection, env: dict[str, str], tmp_path: Path
) -> None:
    await conn.execute("INSERT INTO counters VALUES ('beat', 0)")
    await start_together([process.start for process in processes])
    both_up = await conn.fetchval("SELECT now()")
    await stored_after(conn, both_up, 4)
    submitted = [await received(p) for p in processes]
    await stop(*processes)

    stored = await ticks(conn)
    assert [n for _, n in stored] == [1] * len(stored), "a tick stored twice"
    run_ats = [run_at for run_at, _ in stored]
    assert all(b - a == SECOND for a, b in itertools.pairwise(run_ats)), run_ats
    assert all(n > 0 for n in submitted) and sum(submitted) > len(stored), (
        "both processes submitted the ticks; the store kept one of each"
    )
    applied = await conn.fetchval(
        'SELECT count(*) FROM "BatchOperations" WHERE source = $1 AND status = $2',
        "schedule",
        "SUCCESS",
    )
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'beat'") == applied > 0

    last = await conn.fetchval("SELECT last_tick FROM streamsvc_schedule_ticks WHERE name = 'beat'")
    # the last tick stored; the one before when a stop came between storing and recording
    assert last in run_ats[-2:]
    with anyio.fail_after(60):
        shown = await anyio.run_process(
            [sys.executable, "-m", "streamsvc", "status"],
            env={"PATH": "/usr/bin:/bin", **env, "COLUMNS": "240"},
            cwd=tmp_path,
            check=False,
        )
    out = shown.stdout.decode()
    assert shown.returncode == 0, shown.stderr.decode()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    line = re.search(rf"beat\s*│\s*\*/1 \* \* \* \* \*\s*│\s*({stamp})\s*│\s*({stamp})", out)
    assert line is not None, out
    assert line.group(1) == last.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert line.group(2) > line.group(1)


async def test_ticks_missed_while_nothing_ran_are_coalesced_into_one_on_start(
    processes: list[ServiceProcess], conn: asyncpg.Connection
) -> None:
    await conn.execute("INSERT INTO counters VALUES ('beat', 0)")
    first, second = processes
    await first.start()
    await stored_after(conn, await conn.fetchval("SELECT now()"), 2)
    await stop(first)
    last = (await ticks(conn))[-1][0]  # the last tick it stored (and recorded, or nearly)

    async def missed_three() -> bool:
        return bool(await conn.fetchval("SELECT now() > $1", last + 3 * SECOND))

    await eventually(missed_three, within=10, every=0.05)
    await second.start()
    await stored_after(conn, last, 3)
    await stop(second)

    after = [run_at for run_at, n in await ticks(conn) if run_at > last]
    assert after[0] - last >= 3 * SECOND, "the missed ticks before the latest are not run"
    assert all(b - a == SECOND for a, b in itertools.pairwise(after)), after
    late = await conn.fetchval(
        'SELECT created_at > run_at FROM "BatchOperations" WHERE source = $1 AND run_at = $2',
        "schedule",
        after[0],
    )
    assert late, "the coalesced tick is the latest missed one, submitted on start"
    stored = await ticks(conn)
    assert [n for _, n in stored] == [1] * len(stored)
