"""RabbitMQ: connections that come back, and which errors mean "the broker is away"."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq.exceptions
import anyio
import structlog
from aio_pika.abc import AbstractConnection

from streamsvc.policy import RetryPolicy

log = structlog.get_logger("streamsvc.amqp")

CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPConnectionError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel closed under us
    ConnectionError,
    OSError,
    TimeoutError,
)


async def serve(
    url: str,
    retry: RetryPolicy,
    session: Callable[[AbstractConnection], Awaitable[None]],
    *,
    who: str,
    stopping: anyio.Event,
) -> None:
    """Run ``session`` on a live connection, again on a new one whenever it is lost,
    until ``stopping`` is set. Connecting backs off and says what it will do next."""
    failures = 0
    while not stopping.is_set():
        try:
            connection = await aio_pika.connect(url, timeout=10)
        except CONNECTION_EXCEPTIONS as exc:
            failures += 1
            await _pause("amqp.connect_failed", who, exc, retry.backoff_s(failures), stopping)
            continue
        if failures:
            log.info("amqp.connected", who=who, after_failures=failures)
        lost: BaseException | None = None
        try:
            await session(connection)
            failures = 0
        except* CONNECTION_EXCEPTIONS as group:  # sessions run task groups: errors come grouped
            lost = group.exceptions[0]
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _close_quietly(connection)
        if lost is not None:
            failures += 1
            await _pause("amqp.connection_lost", who, lost, retry.backoff_s(failures), stopping)


async def _pause(
    event: str, who: str, exc: BaseException, delay: float, stopping: anyio.Event
) -> None:
    log.warning(
        event, who=who, error=str(exc) or type(exc).__name__, next=f"reconnecting in {delay:.1f} s"
    )
    with anyio.move_on_after(delay):
        await stopping.wait()


async def _close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(*CONNECTION_EXCEPTIONS):
        await connection.close()
