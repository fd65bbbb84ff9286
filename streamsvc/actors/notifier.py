"""Notifier: relay outcomes from the outcome stream to RabbitMQ, confirmed, then XACK.

Messages are NestJS events (``{"pattern": ..., "data": ...}``, no ``id``) so a NestJS
``@EventPattern`` handler receives them. Each outcome goes to the topic exchange under
``<operationType>.<STATUS>``, and to the queue configured for its operationType. In
``aggregate`` mode (the old service's grouping) the outcomes of one flush travel as one
message per route (cut in parts of about 4 MiB when their ``meta`` is large); in
``operation`` mode one message per operation.

Messages are persistent and published with confirms; the stream entry is acked only once
RabbitMQ confirmed every message of it. While RabbitMQ is away, outcomes wait in the stream.
A message RabbitMQ can never take goes to the dead-letter stream with its outcomes and the
reason, and the notifier goes on with the others: a routing key beyond AMQP's 255 bytes or a
body above STREAMSVC_AMQP_MAX_MESSAGE_BYTES (caught before publishing), a nack, or a channel
the broker closed over that message (``amqp.REFUSALS``). A channel the broker closes fails
every message in flight on it, so those go again one at a time on a new channel: the one
refused again is the one at fault. Only a lost connection leaves the entries to be read again.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Literal, NamedTuple

import aio_pika
import aiormq.exceptions
import anyio
import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from streamsvc import metrics, tracing
from streamsvc.actors.heartbeat import abandoned_after_ms
from streamsvc.adapters import amqp
from streamsvc.adapters import streams as rs
from streamsvc.backoff import pause
from streamsvc.model import Outcome, Status, json_encoder, outcomes_decoder
from streamsvc.policy import RetryPolicy
from streamsvc.settings import Route

log = structlog.get_logger("streamsvc.notifier")

OPERATION_PATTERN = "batch_operation_finished"
AGGREGATE_PATTERN = "batch_operations_finished"
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)

Mode = Literal["operation", "aggregate"]


class Event(msgspec.Struct):
    pattern: str
    data: Any


class Succeeded(msgspec.Struct, rename="camel"):
    id: str
    meta: Any = None
    user_operation_id: str | None = None


class Failed(msgspec.Struct, rename="camel"):
    id: str
    error: str | None
    meta: Any = None
    user_operation_id: str | None = None


class Grouped(msgspec.Struct, rename="camel"):
    operation_type: str
    success: list[Succeeded]
    failed: list[Failed]


_encoder = msgspec.json.Encoder()
MAX_ROUTING_KEY_BYTES = 255  # AMQP's short string
# Aggregated events are cut in parts of about this size, or a quarter of the broker's
# max_message_size when that is smaller; a message still above the limit is dead-lettered.
AGGREGATE_BUDGET_BYTES = 4 * 1024 * 1024


class Publication(NamedTuple):
    exchange: str | None  # None: the default exchange (a route's queue)
    key: str
    body: bytes
    outcomes: list[Outcome]  # what the message reports, dead-lettered if it cannot go


def publications(
    outcomes: list[Outcome],
    routes: dict[str, Route],
    mode: Mode,
    exchange: str,
    budget: int = AGGREGATE_BUDGET_BYTES,
) -> list[Publication]:
    """Pure: the messages a batch of outcomes becomes (see the module docstring)."""
    out: list[Publication] = []
    if mode == "operation":
        for o in outcomes:
            data = o.event()  # {id, operationType, status, error, ...}
            out.append(
                Publication(
                    exchange,
                    f"{o.operation_type}.{o.status.value}",
                    _encoder.encode(Event(OPERATION_PATTERN, data)),
                    [o],
                )
            )
            route = routes.get(o.operation_type)
            if route is not None:
                event = Event(route.pattern or OPERATION_PATTERN, data)
                out.append(Publication(None, route.queue, _encoder.encode(event), [o]))
        return out
    by_type: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_type[o.operation_type].append(o)
    for op_type, group in by_type.items():
        for status in (Status.SUCCESS, Status.FAIL, Status.CANCELLED):
            subset = [o for o in group if o.status is status]
            for part in _parts(subset, budget):
                event = Event(AGGREGATE_PATTERN, _grouped(op_type, part))
                key = f"{op_type}.{status.value}"
                out.append(Publication(exchange, key, _encoder.encode(event), part))
        route = routes.get(op_type)
        if route is not None:
            for part in _parts(group, budget):
                event = Event(route.pattern or AGGREGATE_PATTERN, _grouped(op_type, part))
                out.append(Publication(None, route.queue, _encoder.encode(event), part))
    return out


def _parts(outcomes: list[Outcome], budget: int) -> list[list[Outcome]]:
    """``outcomes`` in runs whose aggregated message stays around ``budget`` bytes (one
    outcome alone may exceed it): big ``meta`` values do not add up past the broker's limit."""
    parts: list[list[Outcome]] = [[]]
    size = 0
    for o in outcomes:
        weight = 100 + len(o.id) + len(o.error or "")
        if o.meta is not None:
            weight += len(_encoder.encode(o.meta))
        if parts[-1] and size + weight > budget:
            parts.append([])
            size = 0
        parts[-1].append(o)
        size += weight
    return parts if parts[0] else []


def _grouped(op_type: str, outcomes: list[Outcome]) -> Grouped:
    return Grouped(
        op_type,
        [
            Succeeded(o.id, o.meta, o.user_operation_id)
            for o in outcomes
            if o.status is Status.SUCCESS
        ],
        [
            Failed(o.id, _failed_error(o), o.meta, o.user_operation_id)
            for o in outcomes
            if o.status is not Status.SUCCESS
        ],
    )


def _failed_error(o: Outcome) -> str | None:
    """A failed entry's error; a cancelled operation (which the old service's grouping has
    no list for) is among the failed with the error "cancelled"."""
    return "cancelled" if o.status is Status.CANCELLED else o.error


class Publisher:
    """The notifier's confirmed channel and the exchanges it publishes to; opened again
    (declaring them again) after the broker closed it."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        exchange: str,
        routes: dict[str, Route],
        durable_queues: bool,
    ) -> None:
        self.connection = connection
        self.exchange_name = exchange
        self.routes = routes
        self.durable_queues = durable_queues
        self.channel: AbstractChannel | None = None
        self.raw: aiormq.Channel | None = None  # aiormq's, under ``channel``: what publishes

    async def open(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(*amqp.CONNECTION_EXCEPTIONS, *amqp.REFUSALS):
                await self.channel.close()  # most often closed by the broker already
        channel = await amqp.open_channel(self.connection, confirms=True)
        await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for route in self.routes.values():
            await channel.declare_queue(route.queue, durable=self.durable_queues)
        self.channel = channel
        self.raw = await amqp.underlay(channel)

    async def publish(self, publication: Publication) -> None:
        """Publish, returning once RabbitMQ confirmed (a nack raises DeliveryError); traced,
        its context in the headers. Published on aiormq's channel underneath, without an
        aio-pika Message per message (as RPC replies are, streamsvc.adapters.deliveries)."""
        raw = self.raw
        if raw is None or raw.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the notifier's channel is closed")
        with tracing.publish(
            publication.outcomes, exchange=publication.exchange, routing_key=publication.key
        ) as headers:
            properties = aiormq.spec.Basic.Properties(
                delivery_mode=PERSISTENT, content_type="application/json", headers=headers
            )
            # Not mandatory: a topic event nobody subscribed to is dropped by design, and
            # each route's queue is declared before publishing.
            await raw.basic_publish(
                publication.body,
                exchange=publication.exchange or "",
                routing_key=publication.key,
                properties=properties,
            )


class Notifier:
    def __init__(
        self,
        name: str,
        streams: rs.Streams,
        retry: RetryPolicy,
        *,
        url: str,
        exchange: str,
        routes: dict[str, Route],
        mode: Mode,
        durable_queues: bool,
        max_message_bytes: int = 16 * 1024 * 1024,
        count: int = 100,
        block_ms: int = 1000,
        heartbeat_ms: int = 1000,
    ) -> None:
        self.name = name
        self.heartbeat_ms = heartbeat_ms
        self.streams = streams
        self.retry = retry
        self.url = url
        self.exchange_name = exchange
        self.routes = routes
        self.mode = mode
        self.durable_queues = durable_queues
        self.max_message_bytes = max_message_bytes
        self.count = count
        self.block_ms = block_ms
        self.stopping = anyio.Event()

    async def run(self) -> None:
        await amqp.serve(
            self.url, self.retry, self._session, who="notifier", stopping=self.stopping
        )

    def stop(self) -> None:
        self.stopping.set()

    def publisher(self, connection: AbstractConnection) -> Publisher:
        return Publisher(
            connection,
            exchange=self.exchange_name,
            routes=self.routes,
            durable_queues=self.durable_queues,
        )

    async def _session(self, connection: AbstractConnection) -> None:
        publisher = self.publisher(connection)
        await publisher.open()
        own_pending, failures, next_dead = True, 0, 0.0
        while not self.stopping.is_set():
            try:
                entries: list[rs.Entry] = []
                if time.monotonic() >= next_dead:  # a dead notifier's, within seconds
                    next_dead = time.monotonic() + self.heartbeat_ms / 1000
                    entries = await self.streams.claim_from_dead(
                        self.streams.names.outcomes,
                        rs.NOTIFIER_GROUP,
                        self.name,
                        min_idle_ms=abandoned_after_ms(self.heartbeat_ms),
                        count=self.count,
                    )
                    # Here nothing is in flight, so whatever Redis counts as ours was
                    # delivered by a read whose answer never came back (a connection cut
                    # after Redis ran it, or redis-py sending it again): read those again.
                    own_pending = own_pending or not entries
                # No gathering here: a batch's outcomes come in one entry (streamsvc.pacing).
                entries = entries or await self.streams.read(
                    self.streams.names.outcomes,
                    rs.NOTIFIER_GROUP,
                    self.name,
                    count=self.count,
                    block_ms=None if own_pending else min(self.block_ms, self.heartbeat_ms),
                    own_pending=own_pending,
                )
            except rs.CONNECTION_EXCEPTIONS as exc:
                failures += 1
                await pause(
                    log, "notifier.redis_unavailable", exc, self.retry, failures, "reading again"
                )
                continue
            failures = 0
            if not entries:
                own_pending = False
                continue
            dead = await self.deliver(publisher, entries)  # a lost connection ends the session
            try:
                await self.acknowledge(entries, dead)
            except rs.CONNECTION_EXCEPTIONS as exc:  # published again, at least once
                failures, own_pending = failures + 1, True
                await pause(
                    log, "notifier.redis_unavailable", exc, self.retry, failures, "reading again"
                )

    async def relay(self, publisher: Publisher, entries: list[rs.Entry]) -> None:
        """Publish every outcome of ``entries``, wait for the confirms, then ack them;
        what cannot be published is dead-lettered in the same step as the ack. A lost
        connection propagates: nothing is acked, the entries are read again."""
        await self.acknowledge(entries, await self.deliver(publisher, entries))

    async def deliver(self, publisher: Publisher, entries: list[rs.Entry]) -> list[dict[str, Any]]:
        """Publish every outcome of ``entries`` and wait for the confirms; return the
        dead letters of what cannot be published."""
        outcomes: list[Outcome] = []
        dead: list[dict[str, Any]] = []
        for entry_id, fields in entries:
            try:
                outcomes.extend(outcomes_decoder.decode(fields[b"o"]))
            except (msgspec.ValidationError, msgspec.DecodeError, KeyError) as exc:
                log.error(
                    "notifier.undecodable_entry",
                    entry=entry_id.decode(),
                    error=str(exc),
                    next="dead-lettered",
                )
                why = f"undecodable outcome entry: {exc}"
                dead.append({"entry": entry_id, "o": fields.get(b"o", b""), "reason": why})
        metrics.relay_size.observe(len(outcomes))
        # Every entry read together aggregates into the same messages: a notifier that
        # fell behind catches up with fewer, larger ones.
        budget = min(AGGREGATE_BUDGET_BYTES, self.max_message_bytes // 4)
        messages = publications(outcomes, self.routes, self.mode, self.exchange_name, budget)
        refused: list[tuple[Publication, str]] = []
        again: list[Publication] = []
        async with anyio.create_task_group() as tg:
            for publication in messages:
                reason = unpublishable(publication, self.max_message_bytes)
                if reason is not None:
                    refused.append((publication, reason))
                    continue
                tg.start_soon(_publish, publisher, publication, refused, again)
        if again:
            await self._one_at_a_time(publisher, again, refused)
        for publication, reason in refused:
            log.error(
                "notifier.unpublishable",
                routing_key=publication.key[:100],
                outcomes=len(publication.outcomes),
                ids=[o.id for o in publication.outcomes],
                batch_ids=sorted({o.batch_id for o in publication.outcomes if o.batch_id}),
                reason=reason,
                next="dead-lettered",
            )
            dead.append(_dead_letter(publication, reason))
            metrics.dead_lettered.inc(len(publication.outcomes))
        metrics.notifications.labels(self.mode).inc(len(messages) - len(refused))
        return dead

    async def acknowledge(self, entries: list[rs.Entry], dead: list[dict[str, Any]]) -> None:
        """Ack ``entries`` and add ``dead`` to the dead-letter stream, in one step."""
        names = self.streams.names
        with anyio.CancelScope(shield=True):
            await self.streams.ack_with(
                names.outcomes, rs.NOTIFIER_GROUP, [eid for eid, _ in entries], names.dead, dead
            )

    @staticmethod
    async def _one_at_a_time(
        publisher: Publisher, again: list[Publication], refused: list[tuple[Publication, str]]
    ) -> None:
        """Publish ``again`` (the messages in flight on a channel the broker closed) one at a
        time on a new channel: a refusal now is of that message alone."""
        log.warning(
            "notifier.channel_closed",
            messages=len(again),
            next="publishing them again one at a time on a new channel",
        )
        await publisher.open()
        for publication in again:
            try:
                await publisher.publish(publication)
            except amqp.REFUSALS as exc:
                refused.append((publication, _reason(exc)))
                if isinstance(exc, aiormq.exceptions.AMQPChannelError):
                    await publisher.open()


async def _publish(
    publisher: Publisher,
    publication: Publication,
    refused: list[tuple[Publication, str]],
    again: list[Publication],
) -> None:
    """Publish among others on one channel. A nack lands in ``refused``; a closed channel
    (by this message or another in flight) in ``again``; a lost connection propagates."""
    try:
        await publisher.publish(publication)
    except aiormq.exceptions.DeliveryError as exc:  # this message's own answer
        refused.append((publication, _reason(exc)))
    except (aiormq.exceptions.AMQPChannelError, aiormq.exceptions.ChannelInvalidStateError):
        again.append(publication)  # opening a new channel tells if the connection is gone
    except amqp.CONNECTION_EXCEPTIONS:
        raise
    except Exception as exc:  # refused by the client library, e.g. aiormq's own checks
        refused.append((publication, _reason(exc)))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def unpublishable(publication: Publication, max_message_bytes: int) -> str | None:
    """Pure: why RabbitMQ could never take ``publication``, or None."""
    size = len(publication.key.encode(errors="surrogatepass"))
    if size > MAX_ROUTING_KEY_BYTES:
        return f"routing key of {size} bytes, AMQP allows {MAX_ROUTING_KEY_BYTES}"
    if len(publication.body) > max_message_bytes:
        return (
            f"message of {len(publication.body)} bytes, above the {max_message_bytes} allowed "
            "(STREAMSVC_AMQP_MAX_MESSAGE_BYTES)"
        )
    return None


def _dead_letter(publication: Publication, reason: str) -> dict[str, Any]:
    return {
        "outcomes": json_encoder.encode(publication.outcomes),
        "exchange": publication.exchange or "",
        "routingKey": publication.key,
        "reason": reason,
    }
