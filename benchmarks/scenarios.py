"""The ways a benchmark submits operations: each returns once every one was answered
(RPC) or handed over (inbox); the caller then waits until none is pending."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import anyio
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from benchmarks.harness import produce

_encode = msgspec.json.encode


class RpcClient:
    """What a NestJS ClientRMQ does, with many requests in flight."""

    def __init__(self, channel: AbstractChannel, queue: str, reply_to: str) -> None:
        self.channel, self.queue, self.reply_to = channel, queue, reply_to
        self.waiting: dict[str, anyio.Event] = {}
        self.refused = 0

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        if b'"status":false' in message.body:
            self.refused += 1
        event = self.waiting.pop(message.correlation_id or "", None)
        if event is not None:
            event.set()

    async def send(self, pattern: str, data: Any) -> None:
        request_id = str(uuid.uuid4())
        done = self.waiting[request_id] = anyio.Event()
        body = _encode({"pattern": pattern, "data": data, "id": request_id})
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id=request_id, reply_to=self.reply_to),
            routing_key=self.queue,
        )
        await done.wait()


@asynccontextmanager
async def rpc_client(url: str, queue: str) -> AsyncIterator[RpcClient]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()  # a confirm channel, as NestJS's ClientRMQ uses
        await channel.declare_queue(queue, durable=True)
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        client = RpcClient(channel, queue, replies.name)
        await replies.consume(client.on_reply, no_ack=True)
        yield client


async def inbox(redis: Any, inbox_stream: str, ops: list[dict[str, Any]], **_: Any) -> None:
    await produce(redis, inbox_stream, ops)


async def rpc_single(
    client: RpcClient, ops: list[dict[str, Any]], *, in_flight: int = 64, **_: Any
) -> None:
    """createOperation, one operation a request, ``in_flight`` requests outstanding."""
    pending = iter(ops)

    async def caller() -> None:
        for op in pending:
            await client.send("createOperation", op)

    async with anyio.create_task_group() as tg:
        for _ in range(in_flight):
            tg.start_soon(caller)


async def rpc_bulk(
    client: RpcClient,
    ops: list[dict[str, Any]],
    *,
    size: int = 100,
    in_flight: int = 8,
    **_: Any,
) -> None:
    """create_operations with lists of ``size``, ``in_flight`` lists outstanding."""
    lists = iter([ops[i : i + size] for i in range(0, len(ops), size)])

    async def caller() -> None:
        for chunk in lists:
            await client.send("create_operations", chunk)

    async with anyio.create_task_group() as tg:
        for _ in range(in_flight):
            tg.start_soon(caller)
