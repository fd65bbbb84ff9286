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
from aio_pika.abc import AbstractIncomingMessage

from streamsvc.settings import Settings
from tests.conftest import PG, keyed_settings, make_settings
from tests.nest import NestClient, nest_client
from tests.pipeline import eventually, order, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

NO_HANDLER = "There is no matching message handler defined in the remote service."


@pytest.fixture
def settings(database: str, prefix: str) -> Settings:
    return make_settings(
        database,
        prefix,
        STREAMSVC_NOTIFY_ROUTES=json.dumps(
            {"ORDER_CREATED": {"queue": f"{prefix}-orders", "pattern": "order_done"}}
        ),
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[NestClient]:
    async with nest_client(settings.rmq_queue) as nest:
        yield nest
        await nest.channel.queue_delete(f"{settings.redis_prefix}-orders")


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
        events: list[tuple[str | None, dict[str, Any], aio_pika.DeliveryMode]] = []
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
    assert {"id": ids[0], "meta": {"req": 7}, "userOperationId": None} in success["data"]["success"]
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
    settings = keyed_settings(database, prefix)
    db = await asyncpg.connect(database=database, **PG)
    try:
        async with nest_client(settings.rmq_queue) as client, serving(settings) as service:
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
            await client.publish(body, request_id, headers={"x-api-key": key})
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
