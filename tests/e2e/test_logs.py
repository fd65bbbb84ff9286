"""Every line a `streamsvc run` process writes is a JSON object (streamsvc.logs): its own
events, uvicorn's start-up and shutdown lines, and any other library's; the lines about a
batch carry its batch_id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from benchmarks.harness import ServiceProcess
from tests.conftest import settings_env
from tests.pipeline import eventually, order

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines()]  # fails on any other line
    assert all(isinstance(line, dict) and "event" in line and "level" in line for line in lines)
    return lines


async def test_every_line_is_json_and_a_batchs_lines_carry_its_id(
    database: str, prefix: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    env = settings_env(database, prefix, STREAMSVC_LOCK_TIMEOUT_MS="100")
    process = ServiceProcess(env, tmp_path)
    try:
        await process.start()
        # A batch that cannot take its table's lock fails (flush.failed) and is tried
        # again until the lock is free.
        async with conn.transaction():
            await conn.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{env['STREAMSVC_HTTP_PORT']}"
            ) as http:
                response = await http.post("/api/operations", json=order(1))
                assert response.status_code == 201, response.text
            await process.wait_for_log('"flush.failed"')
        op_id = response.json()["id"]

        async def applied() -> bool:
            status = await conn.fetchval(
                'SELECT status FROM "BatchOperations" WHERE id = $1::uuid', op_id
            )
            return bool(status == "SUCCESS")

        await eventually(applied, within=15)
        assert await process.terminate() == 0
    finally:
        process.stop()
    lines = json_lines(process.log())
    uvicorn = [line for line in lines if line.get("logger", "").startswith("uvicorn")]
    assert any("Uvicorn running on" in line["event"] for line in uvicorn), uvicorn
    assert any("Finished server process" in line["event"] for line in uvicorn), uvicorn
    failed = [line for line in lines if line["event"] == "flush.failed"]
    assert failed and all(len(line["batch_id"]) == 36 for line in failed)
    assert {line["event"] for line in lines} >= {"service.started", "service.stopped"}
