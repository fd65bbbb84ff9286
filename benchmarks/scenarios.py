"""The ingresses a benchmark submits through, as a caller would use each one.

rpc-single is sent by the callers' own client where node and tests/nestjs's packages are
installed: a NestJS ClientRMQ (tests/nestjs/rpc_client.js, fed over a pipe), else by
aio-pika as ClientRMQ does it; rpc-single-py is always the aio-pika one, the second row.

An `Ingress` is one kind of request (an inbox pipeline, an RPC call, an HTTP POST) and how
many operations it carries. `drive` submits closed-loop: a few requests outstanding, the
next sent as soon as one is answered. `benchmarks.latency` submits the same requests
open-loop, on a schedule. Either returns once every request was answered (RPC, HTTP) or
handed over (inbox); the caller then waits until no operation is pending.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import httpx
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from anyio.streams.buffered import BufferedByteReceiveStream

from benchmarks.harness import RMQ_URL, producer

INGRESSES = ("inbox", "rpc-single", "rpc-single-py", "rpc-bulk", "http-bulk")
NESTJS = Path(__file__).parent.parent / "tests" / "nestjs"
NEST_CLIENT = NESTJS / "rpc_client.js"
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
    via: str = ""  # the client, where there is a choice


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
    elif name == "rpc-single" and nest_available():
        async with nest_client(queue) as nest_send:

            async def nest_one(ops: list[Op]) -> None:
                if not await nest_send(ops[0]):
                    raise AssertionError(f"{name}: the service refused a request")

            yield Ingress(name, size=1, in_flight=64, request=nest_one, via="NestJS ClientRMQ")
    elif name in ("rpc-single", "rpc-single-py", "rpc-bulk"):
        async with rpc_client(RMQ_URL, queue) as client:
            if name != "rpc-bulk":

                async def one(ops: list[Op]) -> None:
                    await client.send("createOperation", ops[0])

                yield Ingress(name, size=1, in_flight=64, request=one, via="aio-pika")
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


def nest_available() -> bool:
    return shutil.which("node") is not None and (NESTJS / "node_modules" / "@nestjs").is_dir()


@asynccontextmanager
async def nest_client(queue: str) -> AsyncIterator[Callable[[Op], Awaitable[bool]]]:
    """A NestJS ClientRMQ in a node process (tests/nestjs/rpc_client.js): yields
    ``send(op)``, which sends createOperation and returns whether it was accepted. Its
    requests are lines on the process's stdin, its answers lines on its stdout."""
    env = {**os.environ, "RMQ_URL": RMQ_URL, "RPC_QUEUE": queue}
    node = shutil.which("node") or "node"
    async with await anyio.open_process([node, str(NEST_CLIENT)], env=env, stderr=None) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        stdin, lines = proc.stdin, BufferedByteReceiveStream(proc.stdout)
        ready = msgspec.json.decode(await lines.receive_until(b"\n", 1 << 20))
        assert ready == {"ready": True}, ready
        waiting: dict[int, anyio.Event] = {}
        accepted: dict[int, bool] = {}
        writing = anyio.Lock()
        numbers = itertools.count()

        async def answers() -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
                while True:
                    reply = msgspec.json.decode(await lines.receive_until(b"\n", 1 << 20))
                    accepted[reply["n"]] = reply["ok"]
                    waiting.pop(reply["n"]).set()

        async def send(op: Op) -> bool:
            n = next(numbers)
            done = waiting[n] = anyio.Event()
            async with writing:
                await stdin.send(_encode({"n": n, "op": op}) + b"\n")
            await done.wait()
            return accepted.pop(n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(answers)
            try:
                yield send
            finally:
                await stdin.aclose()  # the client answers what is in flight, then exits
                with anyio.fail_after(30):
                    code = await proc.wait()
                tg.cancel_scope.cancel()
        if code != 0:
            raise AssertionError(f"the NestJS client exited {code}")
