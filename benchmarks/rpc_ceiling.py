"""The RabbitMQ request/reply ceiling on this machine, with nothing of streamsvc in it.

A server that answers every request at once and a client with 64 requests in flight:
whatever streamsvc's rpc-single figure is, it cannot beat this. `ceiling` uses Node's
amqplib on both ends (`rpc_ceiling_node.js`, as NestJS callers do) when node and
tests/nestjs/node_modules are there, else aio-pika on both ends (as streamsvc's RPC server).
Run: `.venv/bin/python -m benchmarks.rpc_ceiling [--node]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid
from pathlib import Path

import aio_pika
import anyio
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.harness import RMQ_URL
from benchmarks.scenarios import rpc_client

NODE_SCRIPT = Path(__file__).with_name("rpc_ceiling_node.js")
NODE_MODULES = Path(__file__).parent.parent / "tests" / "nestjs" / "node_modules"


async def echo_server(queue_name: str, ready: anyio.Event) -> None:
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(queue_name, durable=True)

        async def answer(message: AbstractIncomingMessage) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b'{"response":null,"isDisposed":true}', correlation_id=message.correlation_id
                ),
                routing_key=message.reply_to or "",
                mandatory=False,
            )
            await message.ack()

        await queue.consume(answer)
        ready.set()
        await anyio.sleep_forever()


async def python_ceiling(requests: int, in_flight: int = 64) -> float:
    """Requests a second through aio-pika on both ends."""
    queue_name = f"streamsvc-ceiling-{uuid.uuid4().hex[:8]}"
    ready = anyio.Event()
    per_caller = max(1, requests // in_flight)
    async with rpc_client(RMQ_URL, queue_name) as client:
        async with anyio.create_task_group() as server:
            server.start_soon(echo_server, queue_name, ready)
            await ready.wait()

            async def caller() -> None:
                for _ in range(per_caller):
                    await client.send("nothing", None)

            started = time.perf_counter()
            async with anyio.create_task_group() as callers:
                for _ in range(in_flight):
                    callers.start_soon(caller)
            elapsed = time.perf_counter() - started
            server.cancel_scope.cancel()
        await client.channel.queue_delete(queue_name)
    return per_caller * in_flight / elapsed


def node_available() -> bool:
    return shutil.which("node") is not None and (NODE_MODULES / "amqplib").is_dir()


async def node_ceiling(requests: int, in_flight: int = 64) -> float:
    """Requests a second through amqplib on both ends (the script prints one JSON line)."""
    node = shutil.which("node") or "node"
    done = await anyio.run_process(
        [node, str(NODE_SCRIPT), "--requests", str(requests), "--in-flight", str(in_flight)]
    )
    return float(json.loads(done.stdout.decode().strip().splitlines()[-1])["ops_per_s"])


async def ceiling(requests: int, in_flight: int = 64) -> tuple[float, str]:
    """(requests a second, which clients): Node when it is there, else Python."""
    if node_available():
        return await node_ceiling(requests, in_flight), "node amqplib"
    return await python_ceiling(requests, in_flight), "python aio-pika"


async def main(requests: int, in_flight: int, node: bool) -> None:
    if node:
        per_s, via = await node_ceiling(requests, in_flight), "node amqplib"
    else:
        per_s, via = await python_ceiling(requests, in_flight), "python aio-pika"
    print(f"request/reply ceiling ({via} both ends): {per_s:.0f} req/s ({in_flight} in flight)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--node", action="store_true", help="amqplib both ends (needs node)")
    args = parser.parse_args()
    anyio.run(main, args.requests, args.in_flight, args.node, backend_options={"use_uvloop": True})
