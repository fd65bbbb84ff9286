"""Consuming without aio-pika's message objects (streamsvc.adapters.deliveries), on the real
broker: every message handled and settled once, handlers still running are waited for when
consuming stops, and a consumer the broker cancels ends with a connection error."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractChannel

from streamsvc.adapters.deliveries import Delivery, consume
from tests.conftest import RMQ_URL
from tests.pipeline import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
async def channel() -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        yield await connection.channel()


async def test_each_message_is_read_and_settled_once_and_running_handlers_finish(
    channel: AbstractChannel,
) -> None:
    queue = await channel.declare_queue(f"streamsvc-test-{uuid.uuid4().hex[:8]}")
    for n in range(20):
        await channel.default_exchange.publish(
            aio_pika.Message(
                str(n).encode(),
                headers={"x-n": n},
                reply_to="somewhere",
                correlation_id=f"c-{n}",
            ),
            routing_key=queue.name,
        )
    seen: list[tuple[bytes, object, str | None, str | None, bool]] = []
    finished: list[bytes] = []
    started = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        seen.append(
            (
                delivery.body,
                delivery.headers.get("x-n"),
                delivery.reply_to,
                delivery.correlation_id,
                delivery.redelivered,
            )
        )
        if delivery.body == b"0" and not delivery.redelivered:  # nacked once, it comes back
            await delivery.nack(requeue=True)
            return
        started.set()
        await anyio.sleep(0.2)  # still running when consuming is cancelled
        await delivery.ack()
        finished.append(delivery.body)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume, channel, queue.name, handle)
        await started.wait()

        async def all_seen() -> bool:
            return len(seen) == 21

        await eventually(all_seen, within=10, every=0.01)
        tg.cancel_scope.cancel()
    assert sorted(finished, key=int) == [str(n).encode() for n in range(20)], "none cut off"
    assert (b"5", 5, "somewhere", "c-5", False) in seen
    assert [s[4] for s in seen if s[0] == b"0"] == [False, True]
    left = (await queue.declare()).message_count
    await queue.delete(if_unused=False, if_empty=False)
    assert left == 0, "every message settled"


async def test_a_consumer_the_broker_cancels_ends_with_a_connection_error(
    channel: AbstractChannel,
) -> None:
    queue = await channel.declare_queue(f"streamsvc-test-{uuid.uuid4().hex[:8]}")

    async def handle(delivery: Delivery) -> None:
        await delivery.ack()

    async def delete_soon() -> None:
        await anyio.sleep(0.2)
        await queue.delete(if_unused=False, if_empty=False)

    async with anyio.create_task_group() as tg:
        tg.start_soon(delete_soon)
        with (
            anyio.fail_after(10),
            pytest.raises(aio_pika.exceptions.AMQPConnectionError, match="broker"),
        ):
            await consume(channel, queue.name, handle)
