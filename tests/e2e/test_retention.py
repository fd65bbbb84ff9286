"""`streamsvc run` deletes operations that finished before the retention window while it
takes and applies new ones, and counts what it deleted."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import httpx
import pytest

from benchmarks.harness import REDIS_URL, ServiceProcess, count_status, produce
from benchmarks.retention import old_left, seed_old
from streamsvc.adapters import streams as rs
from tests.conftest import settings_env
from tests.pipeline import eventually, order

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_a_running_service_deletes_old_finished_rows_and_keeps_new_ones(
    database: str, prefix: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    await seed_old(conn, 2500, days=8)
    await seed_old(conn, 10, days=6, operation_type="RECENT")
    env = settings_env(database, prefix, STREAMSVC_RETENTION_BATCH="500")
    service = ServiceProcess(env, tmp_path)
    client = rs.connect(REDIS_URL)
    try:
        await service.start()
        await produce(client, rs.Names(prefix).inbox, [order(i) for i in range(200)])

        async def done() -> bool:
            return await old_left(conn) == 0 and await count_status(conn, "SUCCESS") == 210

        await eventually(done, within=30)
        url = f"http://127.0.0.1:{env['STREAMSVC_HTTP_PORT']}/metrics"
        async with httpx.AsyncClient() as http:

            async def counted() -> bool:  # counted just after its delete commits
                metrics = (await http.get(url)).text
                return "streamsvc_operations_expired_total 2500.0" in metrics

            await eventually(counted, within=5)
        assert await service.terminate() == 0
    finally:
        service.stop()
        await client.aclose()
    assert '"retention.done"' in service.log()
