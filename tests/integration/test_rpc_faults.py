"""The service's RabbitMQ connection cut under load: nothing lost, every outcome delivered."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import anyio
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.conftest import PG, RMQ_URL, make_settings
from tests.faults import TcpProxy, tcp_proxy
from tests.pipeline import eventually, serving, statuses

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

REQUESTS = 400


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with tcp_proxy("127.0.0.1", 5672) as p:
        yield p


async def test_connection_cuts_lose_no_request_and_no_outcome(
    database: str, prefix: str, proxy: TcpProxy
) -> None:
    settings = make_settings(
        database,
        prefix,
        BATCH_SERVICE_RMQ_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
        STREAMSVC_NOTIFY_MODE="operation",
        STREAMSVC_RETRY_BASE_MS="50",
    )
    connection = await aio_pika.connect(RMQ_URL)  # the callers reach RabbitMQ directly
    channel = await connection.channel()
    await channel.declare_queue(settings.rmq_queue, durable=True)
    exchange = await channel.declare_exchange(
        settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    events = await channel.declare_queue(exclusive=True)
    await events.bind(exchange, routing_key="#")
    replies_queue = await channel.declare_queue(exclusive=True)
    replies: dict[str, dict[str, object]] = {}
    outcomes: dict[str, str] = {}

    async def on_reply(message: AbstractIncomingMessage) -> None:
        replies[message.correlation_id or ""] = json.loads(message.body)

    async def on_event(message: AbstractIncomingMessage) -> None:
        data = json.loads(message.body)["data"]
        outcomes[data["id"]] = data["status"]

    await replies_queue.consume(on_reply, no_ack=True)
    await events.consume(on_event, no_ack=True)
    conn = await asyncpg.connect(database=database, **PG)
    try:
        async with serving(settings):
            for i in range(REQUESTS):
                request_id = str(uuid.uuid4())  # no userOperationId: the request id must do
                body = {
                    "pattern": "createOperation",
                    "id": request_id,
                    "data": {
                        "operationType": "ORDER_CREATED",
                        "table": "orders",
                        "action": "insert",
                        "values": {"id": i, "customer": "c", "amount": 1},
                    },
                }
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(body).encode(),
                        correlation_id=request_id,
                        reply_to=replies_queue.name,
                    ),
                    routing_key=settings.rmq_queue,
                )
                if i % 100 == 50:
                    proxy.cut()  # mid-run: requests and outcomes in flight are cut off
                    await anyio.sleep(0.05)

            async def everything_answered() -> bool:
                return len(replies) == REQUESTS and len(outcomes) == REQUESTS

            await eventually(everything_answered, within=60)
    finally:
        await connection.close()
    try:
        assert proxy.cuts >= 4
        assert all(r["response"]["status"] for r in replies.values())  # type: ignore[index]
        assert set(outcomes.values()) == {"SUCCESS"}
        assert await statuses(conn) == {"SUCCESS": REQUESTS}, "each request stored once"
        assert await conn.fetchval("SELECT count(*) FROM orders") == REQUESTS
    finally:
        await conn.close()
