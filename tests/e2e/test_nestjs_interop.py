"""The real NestJS RMQ transport, unchanged, against streamsvc.

tests/nestjs/interop.js uses ``@nestjs/microservices`` as a NestJS app does: a ClientRMQ
from ClientProxyFactory sends createOperation and getOperation and emits create_operation
to streamsvc's RPC queue, and a ServerRMQ receives the outcome event streamsvc routes to
its queue. Needs node and npm; the packages are installed from tests/nestjs/package-lock.json.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import asyncpg
import pytest

from tests.conftest import NPM_TIMEOUT_S, PG, RMQ_URL, make_settings
from tests.pipeline import eventually, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
async def event_queue(prefix: str) -> AsyncIterator[str]:
    """The route queue the NestJS server consumes; deleted afterwards."""
    name = f"{prefix}-nest-events"
    yield name
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database=database, **PG)
    yield connection
    await connection.close()


@pytest.mark.timeout(NPM_TIMEOUT_S + 120)  # a first `npm ci` counts towards the test's time
async def test_nestjs_client_and_server_work_unchanged(
    nestjs: Path, database: str, prefix: str, event_queue: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(
        database,
        prefix,
        STREAMSVC_NOTIFY_ROUTES=json.dumps(
            {"ORDER_CREATED": {"queue": event_queue, "pattern": "order_done"}}
        ),
        STREAMSVC_NOTIFY_MODE="aggregate",
    )
    op_id = str(uuid.uuid4())
    env = {
        **os.environ,
        "RMQ_URL": RMQ_URL,
        "RPC_QUEUE": settings.rmq_queue,
        "EVENT_QUEUE": event_queue,
        "EVENT_PATTERN": "order_done",
        "OP_ID": op_id,
    }
    async with serving(settings):
        with anyio.fail_after(60):
            done = await anyio.run_process(
                ["node", str(nestjs / "interop.js")], cwd=nestjs, env=env, check=False
            )
        stdout, stderr = done.stdout.decode(), done.stderr.decode()
        if done.returncode != 0:
            pytest.fail(f"interop.js exited {done.returncode}:\n{stderr}\nstdout:\n{stdout}")
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])

        async def both_orders_landed() -> bool:
            rows = await conn.fetch("SELECT id FROM orders WHERE id = ANY($1::int[])", [1, 2])
            return {r["id"] for r in rows} == {1, 2}

        await eventually(both_orders_landed, within=10)

    assert result["created"] == {
        "status": True,
        "message": "Operation created",
        "data": {
            "id": op_id,
            "operationType": "ORDER_CREATED",
            "status": "UNPROCESSED",
            "created": True,
        },
    }
    got = result["got"]
    assert (got["status"], got["message"]) == (True, "Operation found")
    assert (got["data"]["id"], got["data"]["status"]) == (op_id, "SUCCESS")
    assert got["data"]["operation"]["values"] == {"id": 1, "customer": "nest", "amount": 3}
    event = result["event"]
    assert event["operationType"] == "ORDER_CREATED"
    assert op_id in [s["id"] for s in event["success"]]
    assert event["failed"] == []
    row = await conn.fetchrow("SELECT customer, amount FROM orders WHERE id = 2")
    assert row is not None and (row["customer"], float(row["amount"])) == ("nest", 4.0)
