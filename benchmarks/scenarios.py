"""The ingresses a benchmark submits through, as a caller would use each one.

An `Ingress` is one kind of request (an inbox pipeline, an RPC call, an HTTP POST) and how
many operations it carries. `drive` submits closed-loop: a few requests outstanding, the
next sent as soon as one is answered. `benchmarks.latency` submits the same requests
open-loop, on a schedule. Either returns once every request was answered (RPC, HTTP) or
handed over (inbox); the caller then waits until no operation is pending.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import anyio
import httpx
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from benchmarks.harness import RMQ_URL, producer

INGRESSES = ("inbox", "rpc-single", "rpc-bulk", "http-bulk")
BULK = 100  # operations in one create_operations / POST /api/operations/batch
JSON = {"content-type": "application/json"}

Op = dict[str, Any]
_encode = msgspec.json.encode


@dataclass(frozen=True)
class Ingress:
    """One way in: ``request`` submits a list of operations in one request."""

    name: str
    size: int  # operations one request carries
    in_flight: int  # requests outstanding in a closed-loop run
    request: Callable[[list[Op]], Coroutine[Any, Any, None]]
    coalesce: bool = False  # requests due together may be merged into one (inbox pipeline)


def chunks(ops: list[Op], size: int) -> Iterator[list[Op]]:
    return (ops[i : i + size] for i in range(0, len(ops), size))


async def drive(ingress: Ingress, ops: list[Op]) -> None:
    """Closed loop: ``in_flight`` callers, each sending its next request once answered."""
    pending = chunks(ops, ingress.size)

    async def caller() -> None:
        for chunk in pending:
            await ingress.request(chunk)

    async with anyio.create_task_group() as tg:
        for _ in range(ingress.in_flight):
            tg.start_soon(caller)


@asynccontextmanager
async def connect(
    name: str, *, redis: Any, inbox: str, queue: str, http_url: str
) -> AsyncIterator[Ingress]:
    """The ingress ``name`` of one running service, connected."""
    if name == "inbox":
        async with producer(redis, inbox) as send:
            yield Ingress(name, size=1000, in_flight=1, request=send, coalesce=True)
    elif name in ("rpc-single", "rpc-bulk"):
        async with rpc_client(RMQ_URL, queue) as client:
            if name == "rpc-single":

                async def one(ops: list[Op]) -> None:
                    await client.send("createOperation", ops[0])

                yield Ingress(name, size=1, in_flight=64, request=one)
            else:

                async def bulk(ops: list[Op]) -> None:
                    await client.send("create_operations", ops)

                yield Ingress(name, size=BULK, in_flight=8, request=bulk)
        if client.refused:
            raise AssertionError(f"{name}: the service refused {client.refused} requests")
    elif name == "http-bulk":
        if not http_url:
            raise ValueError("http-bulk needs a service process with role `all` or `ingress`")
        async with httpx.AsyncClient(base_url=http_url, timeout=60, headers=JSON) as http:

            async def post(ops: list[Op]) -> None:
                response = await http.post("/api/operations/batch", content=_encode(ops))
                if response.status_code != 200 or b'"error"' in response.content:
                    raise AssertionError(f"{name}: {response.status_code} {response.text[:500]}")

            yield Ingress(name, size=BULK, in_flight=8, request=post)
    else:
        raise ValueError(f"unknown ingress {name!r}; expected one of {', '.join(INGRESSES)}")


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
