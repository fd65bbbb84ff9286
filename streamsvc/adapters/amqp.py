"""RabbitMQ: connections that come back, and which errors mean "the broker is away" and
which mean "the broker refused this one message"."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import cast

import aio_pika
import aiormq
import aiormq.exceptions
import anyio
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from streamsvc.policy import RetryPolicy

log = structlog.get_logger("streamsvc.amqp")

# The connection is lost or unusable: what was not confirmed is tried again on a new one.
CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPConnectionError,  # aiormq's: every Connection* close, auth, protocol
    aiormq.exceptions.ProtocolSyntaxError,  # a frame that could not be read
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel closed under us
    ConnectionError,
    OSError,
    TimeoutError,
)

# The broker refused one command while the connection lives: a nack of a confirmed publish,
# a mandatory message returned (PublishError), or the channel closed by the broker
# (ChannelClosed and its kinds: 406 PRECONDITION_FAILED for a message above the broker's
# max_message_size, 404 NOT_FOUND for a missing exchange, 403 ACCESS_REFUSED). Sending the
# same message again gets the same answer; the channel, if closed, can be opened again.
REFUSALS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.DeliveryError,  # and PublishError, its subclass
    aiormq.exceptions.AMQPChannelError,
)


async def open_channel(connection: AbstractConnection, *, confirms: bool) -> AbstractChannel:
    """A new channel on ``connection``; a connection found closed is a lost connection
    (aiormq says so with a bare RuntimeError, before aio-pika's is_closed knows)."""
    try:
        return await connection.channel(publisher_confirms=confirms)
    except RuntimeError as exc:
        if isinstance(exc, CONNECTION_EXCEPTIONS):
            raise
        raise aio_pika.exceptions.AMQPConnectionError(str(exc)) from exc


async def underlay(channel: AbstractChannel) -> aiormq.Channel:
    """aiormq's channel under an aio-pika one: where the hot paths publish and settle
    without aio-pika's per-message objects (streamsvc.adapters.deliveries). aio-pika types
    it as aiormq's abstract channel; it is aiormq's own, whose publish and ack can be left
    to its writer (``wait=False``)."""
    return cast(aiormq.Channel, await channel.get_underlay_channel())


def closed_by_broker(exc: BaseException | None) -> bool:
    """Whether a channel's close callback got the broker's refusal, not our own close."""
    return isinstance(exc, aiormq.exceptions.AMQPChannelError) and any(exc.args)


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
        # Sessions run task groups: errors come grouped. A refusal that reaches here (a
        # declaration the broker refuses) ends the session as a lost connection does.
        except* (*CONNECTION_EXCEPTIONS, *REFUSALS) as group:
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
