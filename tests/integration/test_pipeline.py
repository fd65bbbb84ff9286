"""The whole in-process pipeline on the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncpg
import pytest

from benchmarks import workload
from streamsvc.model import Receipt
from streamsvc.settings import Settings
from streamsvc.validate import ANONYMOUS
from tests.conftest import PG
from tests.pipeline import drain, ops, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(database=settings.db_name, **PG)


async def test_mixed_operations_land_exactly_once_in_large_batches(settings: Settings) -> None:
    w = workload.build(10_000)
    conn = await _connect(settings)
    try:
        await workload.seed(conn, w)
        async with running(settings) as service:
            for start in range(0, len(w.ops), 500):
                results = await service.ingress.submit(
                    ops(w.ops[start : start + 500]), caller=ANONYMOUS, source="api"
                )
                assert all(isinstance(r, Receipt) and r.created for r in results)
            await drain(service)
        await workload.verify(conn, w)
        await workload.verify_statuses(conn, w)  # the 1% poison FAIL, the rest SUCCESS
        sizes = [
            r[0]
            for r in await conn.fetch('SELECT count(*) FROM "BatchOperations" GROUP BY batch_id')
        ]
        assert sum(sizes) == 10_000
        large = sum(s for s in sizes if s >= 250)
        assert large >= 0.9 * 10_000, f"most operations should land in large batches: {sizes}"
    finally:
        await conn.close()
