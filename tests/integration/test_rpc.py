"""NestJS-compatible RPC and outcome events, with the exact bytes NestJS sends."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import anyio
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from streamsvc.settings import Settings
from tests.conftest import PG, RMQ_URL, make_settings
from tests.pipeline import eventually, order, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

NO_HANDLER = "There is no matching message handler defined in the remote service."


class NestClient:
    """Sends what ClientRMQ sends; collects replies by correlationId."""

    def __init__(self, channel: AbstractChannel, queue: str, reply_queue: str) -> None:
        self.channel, self.queue, self.reply_queue = channel, queue, reply_queue
        self.replies: dict[str, dict[str, Any]] = {}
        self.arrived = anyio.Event()

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        assert message.correlation_id is not None
        self.replies[message.correlation_id] = json.loads(message.body)
        self.arrived.set()
        self.arrived = anyio.Event()

    async def publish(self, body: bytes, correlation_id: str | None = None) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id=correlation_id, reply_to=self.reply_queue),
            routing_key=self.queue,
        )

    async def send(self, pattern: Any, data: Any) -> dict[str, Any]:
        """``client.send(pattern, data)``: compact JSON, id equal to the correlationId."""
        request_id = str(uuid.uuid4())
        body = json.dumps(
            {"pattern": pattern, "data": data, "id": request_id}, separators=(",", ":")
        ).encode()
        await self.publish(body, request_id)
        return await self.reply(request_id)

    async def emit(self, pattern: str, data: Any) -> None:
        """``client.emit(pattern, data)``: no id, no reply expected."""
        body = json.dumps({"pattern": pattern, "data": data}, separators=(",", ":")).encode()
        await self.channel.default_exchange.publish(aio_pika.Message(body), routing_key=self.queue)

    async def reply(self, correlation_id: str) -> dict[str, Any]:
        with anyio.fail_after(10):
            while correlation_id not in self.replies:
                await self.arrived.wait()
        return self.replies[correlation_id]


@pytest.fixture
def settings(database: str, prefix: str) -> Settings:
    return make_settings(
        database,
        prefix,
        BATCH_SERVICE_RMQ_QUEUE=f"{prefix}-rpc",
        STREAMSVC_EVENTS_EXCHANGE=f"{prefix}-events",
        STREAMSVC_NOTIFY_ROUTES=json.dumps(
            {"ORDER_CREATED": {"queue": f"{prefix}-orders", "pattern": "order_done"}}
        ),
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[NestClient]:
    connection = await aio_pika.connect(RMQ_URL)
    channel = await connection.channel()
    await channel.declare_queue(settings.rmq_queue, durable=True)  # as ClientRMQ asserts it
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    nest = NestClient(channel, settings.rmq_queue, replies.name)
    await replies.consume(nest.on_reply, no_ack=True)
    yield nest
    await channel.queue_delete(f"{settings.redis_prefix}-orders")
    await connection.close()


async def test_create_and_get_operation_replies_exactly(
    settings: Settings, client: NestClient
) -> None:
    op_id = str(uuid.uuid4())
    async with serving(settings):
        created = await client.send("createOperation", order(1, userOperationId=op_id))
        assert created == {
            "response": {
                "status": True,
                "message": "Operation created",
                "data": {
                    "id": op_id,
                    "operationType": "ORDER_CREATED",
                    "status": "UNPROCESSED",
                    "created": True,
                },
            },
            "isDisposed": True,
        }
        again = await client.send("create_operation", order(1, userOperationId=op_id))
        assert again["response"]["message"] == "Operation already exists"
        assert again["response"]["data"]["created"] is False
        with anyio.fail_after(10):
            while True:
                got = await client.send("getOperation", {"id": op_id})
                if got["response"]["data"]["status"] == "SUCCESS":
                    break
                await anyio.sleep(0.05)
        view = got["response"]["data"]
        assert set(got) == {"response", "isDisposed"}
        assert (view["id"], view["attempts"], view["source"]) == (op_id, 1, "rpc")
        assert view["operation"]["values"] == {"id": 1, "customer": "c", "amount": 1}
        by_string = await client.send("get_operation", op_id)
        assert by_string["response"]["data"]["id"] == op_id


async def test_emit_is_processed_and_never_answered(settings: Settings, client: NestClient) -> None:
    op_id = str(uuid.uuid4())
    async with serving(settings):
        await client.emit("create_operation", order(2, userOperationId=op_id))

        async def stored() -> bool:
            return bool((await client.send("getOperation", {"id": op_id}))["response"]["status"])

        await eventually(stored, within=10)
    assert len(client.replies) >= 1
    assert all(
        r["response"]["data"] is None or r["response"]["data"]["id"] == op_id
        for r in client.replies.values()
    ), "only the getOperation requests were answered"


async def test_bulk_create_and_refusals(settings: Settings, client: NestClient) -> None:
    bad = {"operationType": "X", "table": "orders", "action": "insert", "values": {"nope": 1}}
    async with serving(settings):
        bulk = await client.send("create_operations", [order(10), bad, order(11)])
        response = bulk["response"]
        assert (response["status"], response["message"], response["errorCode"]) == (
            False,
            "2 created, 0 existing, 1 refused",
            "VALIDATION_ERROR",
        )
        assert response["data"][1] == {
            "index": 1,
            "field": "values.nope",
            "reason": "no such column in public.orders",
        }
        assert [d.get("created") for d in response["data"]] == [True, None, True]
        refused = await client.send("createOperation", {**order(12), "priority": 42})
        assert refused == {
            "response": {
                "status": False,
                "message": "Operation refused",
                "data": {"field": "priority", "reason": "expected `int` <= 9"},
                "error": "priority: expected `int` <= 9",
                "errorCode": "VALIDATION_ERROR",
            },
            "isDisposed": True,
        }
        missing = await client.send("getOperation", {"id": str(uuid.uuid4())})
        assert missing == {
            "response": {
                "status": False,
                "message": "Operation not found",
                "data": None,
                "error": "Operation not found",
                "errorCode": "NOT_FOUND",
            },
            "isDisposed": True,
        }


async def test_unknown_patterns_and_malformed_requests(
    settings: Settings, client: NestClient
) -> None:
    async with serving(settings):
        request_id = str(uuid.uuid4())
        await client.publish(
            json.dumps({"pattern": "dropTables", "data": {}, "id": request_id}).encode(),
            request_id,
        )
        assert await client.reply(request_id) == {
            "id": request_id,
            "err": NO_HANDLER,
            "status": "error",
        }
        object_id = str(uuid.uuid4())
        await client.publish(
            json.dumps(
                {"pattern": {"cmd": "create", "b": 1}, "data": {}, "id": object_id}
            ).encode(),
            object_id,
        )
        assert (await client.reply(object_id))["err"] == NO_HANDLER
        bad_id = str(uuid.uuid4())
        await client.publish(b"{not json", bad_id)
        reply = await client.reply(bad_id)
        assert set(reply) == {"err", "isDisposed"} and "malformed request" in reply["err"]
        extra_keys = await client.send("getOperation", {"id": str(uuid.uuid4())})
        assert extra_keys["response"]["status"] is False  # the server is still answering


async def test_outcomes_reach_the_topic_exchange_and_the_route_queue(
    settings: Settings, client: NestClient
) -> None:
    channel = client.channel
    exchange = await channel.declare_exchange(
        settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    topic = await channel.declare_queue(exclusive=True)
    await topic.bind(exchange, routing_key="ORDER_CREATED.*")
    route = await channel.declare_queue(f"{settings.redis_prefix}-orders", durable=True)
    async with serving(settings):
        bulk = await client.send(
            "create_operations", [order(20, meta={"req": 7}), order(21), order(20)]
        )
        ids = [d["id"] for d in bulk["response"]["data"]]
        events = []
        with anyio.fail_after(10):
            while len(events) < 2:
                message = await topic.get(fail=False)
                if message is None:
                    await anyio.sleep(0.05)
                    continue
                events.append(
                    (message.routing_key, json.loads(message.body), message.delivery_mode)
                )
                await message.ack()
        routed = await route.get(fail=False) or await _next(route)
    by_key = {key: (body, mode) for key, body, mode in events}
    success, mode = by_key["ORDER_CREATED.SUCCESS"]
    assert mode == aio_pika.DeliveryMode.PERSISTENT
    assert success["pattern"] == "batch_operations_finished"
    assert {s["id"] for s in success["data"]["success"]} == set(ids[:2])
    assert {"id": ids[0], "meta": {"req": 7}} in success["data"]["success"]
    failed = by_key["ORDER_CREATED.FAIL"][0]["data"]["failed"]
    assert [f["id"] for f in failed] == [ids[2]]
    assert "duplicate key" in failed[0]["error"]
    body = json.loads(routed.body)
    assert set(body) == {"pattern", "data"} and body["pattern"] == "order_done"
    assert len(body["data"]["success"]) + len(body["data"]["failed"]) == 3


async def _next(queue: aio_pika.abc.AbstractQueue) -> AbstractIncomingMessage:
    got: list[AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await queue.get(fail=False)
        if message is not None:
            got.append(message)
        return bool(got)

    await eventually(arrived, within=10)
    return got[0]


async def test_api_key_in_header_or_data(database: str, prefix: str) -> None:
    settings = make_settings(
        database, prefix, STREAMSVC_AUTH="on", API_KEY_ENCRYPTION_SECRET="test-secret"
    )
    connection = await aio_pika.connect(RMQ_URL)
    channel = await connection.channel()
    await channel.declare_queue(settings.rmq_queue, durable=True)
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    client = NestClient(channel, settings.rmq_queue, replies.name)
    await replies.consume(client.on_reply, no_ack=True)
    db = await asyncpg.connect(database=database, **PG)
    try:
        async with serving(settings) as service:
            assert service.keys is not None
            key = await service.keys.create(
                db, "orders-svc", tables=["orders"], actions=["insert"], allow_sql=False
            )
            await service.keys.load(db)
            in_data = await client.send("createOperation", {**order(30), "apiKey": key})
            assert in_data["response"]["status"] is True
            request_id = str(uuid.uuid4())
            body = json.dumps(
                {"pattern": "createOperation", "data": order(31), "id": request_id}
            ).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    correlation_id=request_id,
                    reply_to=replies.name,
                    headers={"x-api-key": key},
                ),
                routing_key=settings.rmq_queue,
            )
            assert (await client.reply(request_id))["response"]["status"] is True
            for data in (order(32), {**order(33), "apiKey": "ssk_wrong"}):
                refused = await client.send("createOperation", data)
                assert refused["response"] == {
                    "status": False,
                    "message": "Unauthorized",
                    "error": "key: a valid API key is required",
                    "errorCode": "UNAUTHORIZED",
                }
        who = {r[0] for r in await db.fetch('SELECT submitted_by FROM "BatchOperations"')}
        assert who == {"orders-svc"}
        assert await db.fetchval('SELECT count(*) FROM "BatchOperations"') == 2
        assert "ssk_" not in await db.fetchval(
            """SELECT string_agg(body::text, '') FROM "BatchOperations\""""
        )
    finally:
        await db.close()
        await connection.close()
