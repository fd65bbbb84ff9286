"""The RabbitMQ request/reply ceiling on this machine, with nothing of streamsvc in it.

A server that answers every request at once (aio-pika, like streamsvc's RPC server) and the
benchmark's own client with 64 requests in flight: whatever streamsvc's rpc-single figure
is, it cannot beat this. Run: `.venv/bin/python -m benchmarks.rpc_ceiling`.
"""

from __future__ import annotations

import argparse
import time
import uuid

import aio_pika
import anyio
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.harness import RMQ_URL
from benchmarks.scenarios import rpc_client


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


async def main(requests: int, in_flight: int) -> None:
    queue_name = f"streamsvc-ceiling-{uuid.uuid4().hex[:8]}"
    ready = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(echo_server, queue_name, ready)
        await ready.wait()
        async with rpc_client(RMQ_URL, queue_name) as client:
            per_caller = requests // in_flight

            async def caller() -> None:
                for _ in range(per_caller):
                    await client.send("nothing", None)

            started = time.perf_counter()
            async with anyio.create_task_group() as callers:
                for _ in range(in_flight):
                    callers.start_soon(caller)
            elapsed = time.perf_counter() - started
            await client.channel.queue_delete(queue_name)
        print(
            f"request/reply ceiling: {per_caller * in_flight / elapsed:.0f} req/s "
            f"({in_flight} in flight, no work on the server)"
        )
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    anyio.run(main, args.requests, args.in_flight, backend_options={"use_uvloop": True})
