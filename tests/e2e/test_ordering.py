"""orderingKey across processes: three `streamsvc run` processes share one inbox; each of
20 rows is updated 200 times in order (SET value = n) under its own key, and must end on
its last value, each key's operations stored and applied in the order they were sent
(docs/scheduling.md), however the readers of the three processes share the entries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from benchmarks import scheduling
from benchmarks.harness import REDIS_URL, ServiceProcess, produce, start_together
from streamsvc.adapters import streams as rs
from tests.conftest import settings_env
from tests.pipeline import eventually, statuses

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROWS, UPDATES = 20, 200
PROCESSES = 3
PIPELINE = 50  # XADDs a producer sends at once: the readers of three processes share them


@pytest.fixture
async def services(
    database: str, prefix: str, tmp_path: Path
) -> AsyncIterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        for n in range(PROCESSES):
            workdir = tmp_path / f"p{n}"
            workdir.mkdir()
            started.append(ServiceProcess(settings_env(database, prefix), workdir))
        yield started
    finally:
        for service in started:
            service.stop()


async def test_each_key_applied_in_order_across_three_processes(
    services: list[ServiceProcess], conn: asyncpg.Connection, prefix: str
) -> None:
    rows = [f"row-{n}" for n in range(ROWS)]
    await scheduling.seed_rows(conn, rows)
    await start_together([service.start for service in services])
    redis = rs.connect(REDIS_URL)
    try:
        updates = scheduling.keyed_updates(rows, UPDATES)  # each row's 1..200, interleaved
        await produce(redis, rs.Names(prefix).inbox, updates, pipeline=PIPELINE)
    finally:
        await redis.aclose()

    async def all_finished() -> bool:
        done = await statuses(conn)
        return sum(done.get(s, 0) for s in ("SUCCESS", "FAIL")) >= ROWS * UPDATES

    await eventually(all_finished, within=90, every=0.2)
    assert await statuses(conn) == {"SUCCESS": ROWS * UPDATES}
    problems = await scheduling.key_order_problems(conn, dict.fromkeys(rows, UPDATES))
    assert not problems, "\n".join(problems)
    for service in services:
        assert await service.terminate() == 0
