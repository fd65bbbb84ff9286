"""Gathering on the real servers (streamsvc.pacing, docs/efficiency.md): operations that keep
coming close behind each other are applied by one batch, while each caller is answered as
soon as its operation is stored; one after a quiet moment is not held back at all."""

from __future__ import annotations

import time

import anyio
import pytest

from tests.conftest import make_settings
from tests.pipeline import eventually, order, post_batch, served_with_clients

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

GATHER_MS = 1500


async def test_requests_close_behind_each_other_are_answered_at_once_and_share_a_batch(
    database: str, prefix: str
) -> None:
    settings = make_settings(database, prefix, STREAMSVC_GATHER_MS=str(GATHER_MS))
    async with served_with_clients(settings) as served:
        started = time.monotonic()
        (first,) = await post_batch(served, order(1))
        assert time.monotonic() - started < GATHER_MS / 1000 / 2, "held back after a lull"
        ids: list[str] = []

        async def post(n: int) -> None:
            await anyio.sleep(0.05 * n)  # one request every 50 ms, each on its own
            sent = time.monotonic()
            ids.extend(await post_batch(served, order(n)))
            assert time.monotonic() - sent < GATHER_MS / 1000 / 2, "an answer held back"

        async with anyio.create_task_group() as tg:
            for n in range(2, 5):
                tg.start_soon(post, n)

        async def finished() -> bool:
            done = await served.db.fetchval(
                """SELECT count(*) FROM "BatchOperations" WHERE status = 'SUCCESS'"""
            )
            return bool(done == 4)

        await eventually(finished, within=15)
        rows = await served.db.fetch(
            """SELECT batch_id FROM "BatchOperations" WHERE id = ANY($1::uuid[])""",
            ids,
        )
        assert len({r["batch_id"] for r in rows}) == 1, "applied by one batch transaction"
        alone = await served.db.fetchval(
            """SELECT batch_id FROM "BatchOperations" WHERE id = $1::uuid""", first
        )
        assert alone not in {r["batch_id"] for r in rows}
