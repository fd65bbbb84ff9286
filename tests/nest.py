"""A client that speaks exactly as NestJS's ClientRMQ does, for tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import anyio
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from benchmarks.harness import RMQ_URL


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

    async def publish(
        self, body: bytes, correlation_id: str | None = None, headers: dict[str, Any] | None = None
    ) -> None:
        message = aio_pika.Message(
            body, correlation_id=correlation_id, reply_to=self.reply_queue, headers=headers
        )
        await self.channel.default_exchange.publish(message, routing_key=self.queue)

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


@asynccontextmanager
async def nest_client(queue: str) -> AsyncIterator[NestClient]:
    """Connected, with the RPC queue asserted durable as ClientRMQ asserts it."""
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        client = NestClient(channel, queue, replies.name)
        await replies.consume(client.on_reply, no_ack=True)
        yield client
