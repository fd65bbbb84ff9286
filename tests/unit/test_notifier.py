from __future__ import annotations

from typing import Any

import aiormq
import anyio
import fakeredis
import msgspec
import pytest
import redis.exceptions
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from streamsvc.actors.notifier import Notifier, Publication, publications, unpublishable
from streamsvc.adapters import amqp
from streamsvc.adapters import streams as rs
from streamsvc.model import Outcome, Status, work_encoder
from streamsvc.policy import RetryPolicy
from streamsvc.settings import Route

OUTCOMES = [
    Outcome("a", "ORDER", Status.SUCCESS, None, 1, "b1", {"req": 1}, "u-a"),
    Outcome("b", "ORDER", Status.FAIL, "duplicate key", 1, "b1"),
    Outcome("c", "PAY", Status.SUCCESS, None, 2, "b1"),
]
ROUTES = {"ORDER": Route(queue="orders", pattern="order_done")}


def decoded(pubs: list[Publication]) -> list[tuple[str | None, str, object]]:
    return [(exchange, key, msgspec.json.decode(body)) for exchange, key, body, _ in pubs]


def test_aggregate_mode_groups_a_flush_per_type_status_and_route_with_both_ids() -> None:
    assert decoded(publications(OUTCOMES, ROUTES, "aggregate", "events")) == [
        (
            "events",
            "ORDER.SUCCESS",
            {
                "pattern": "batch_operations_finished",
                "data": {
                    "operationType": "ORDER",
                    "success": [{"id": "a", "meta": {"req": 1}, "userOperationId": "u-a"}],
                    "failed": [],
                },
            },
        ),
        (
            "events",
            "ORDER.FAIL",
            {
                "pattern": "batch_operations_finished",
                "data": {
                    "operationType": "ORDER",
                    "success": [],
                    "failed": [
                        {"id": "b", "error": "duplicate key", "meta": None, "userOperationId": None}
                    ],
                },
            },
        ),
        (
            None,
            "orders",
            {
                "pattern": "order_done",
                "data": {
                    "operationType": "ORDER",
                    "success": [{"id": "a", "meta": {"req": 1}, "userOperationId": "u-a"}],
                    "failed": [
                        {"id": "b", "error": "duplicate key", "meta": None, "userOperationId": None}
                    ],
                },
            },
        ),
        (
            "events",
            "PAY.SUCCESS",
            {
                "pattern": "batch_operations_finished",
                "data": {
                    "operationType": "PAY",
                    "success": [{"id": "c", "meta": None, "userOperationId": None}],
                    "failed": [],
                },
            },
        ),
    ]


def test_operation_mode_sends_one_event_per_operation() -> None:
    pubs = decoded(publications(OUTCOMES, ROUTES, "operation", "events"))
    assert [(e, k) for e, k, _ in pubs] == [
        ("events", "ORDER.SUCCESS"),
        (None, "orders"),
        ("events", "ORDER.FAIL"),
        (None, "orders"),
        ("events", "PAY.SUCCESS"),
    ]
    assert pubs[0][2] == {
        "pattern": "batch_operation_finished",
        "data": {
            "id": "a",
            "operationType": "ORDER",
            "status": "SUCCESS",
            "error": None,
            "attempts": 1,
            "batchId": "b1",
            "meta": {"req": 1},
            "userOperationId": "u-a",
        },
    }
    assert pubs[1][2]["pattern"] == "order_done"  # type: ignore[index]


def test_each_message_carries_the_outcomes_it_reports() -> None:
    carried = [
        (p.key, [o.id for o in p.outcomes])
        for p in publications(OUTCOMES, ROUTES, "aggregate", "events")
    ]
    assert carried == [
        ("ORDER.SUCCESS", ["a"]),
        ("ORDER.FAIL", ["b"]),
        ("orders", ["a", "b"]),
        ("PAY.SUCCESS", ["c"]),
    ]


@pytest.mark.parametrize(
    ("key", "refused"),
    [
        ("é" * 123 + ".SUCCESS", False),  # 254 bytes
        ("é" * 124 + ".SUCCESS", True),  # 256 bytes
        ("x" * 255, False),
    ],
)
def test_routing_keys_beyond_255_bytes_are_unpublishable(key: str, refused: bool) -> None:
    reason = unpublishable(Publication("events", key, b"{}", []), 1024)
    assert (reason is not None) is refused
    assert reason is None or "AMQP allows 255" in reason


def one_by_one(streams: rs.Streams, max_message_bytes: int = 16 * 1024 * 1024) -> Notifier:
    """A notifier in operation mode that gives up at once, with no server behind it."""
    return Notifier(
        "n",
        streams,
        RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1),
        url="",
        exchange="events",
        routes={},
        mode="operation",
        durable_queues=True,
        max_message_bytes=max_message_bytes,
    )


class FakeBroker:
    """Takes every message but those whose routing key starts with ``BOOM``, which it
    answers with ``error``. As RabbitMQ does, a channel error closes the channel (messages
    still in flight on it fail) and a connection error loses the connection."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.published: list[str] = []
        self.channels = 0
        self.lost = False

    async def channel(self, **_: Any) -> FakeChannel:
        if self.lost:
            raise ConnectionResetError("connection reset")
        self.channels += 1
        return FakeChannel(self)


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.is_closed = False

    async def declare_exchange(self, *_: Any, **__: Any) -> None:
        pass

    async def declare_queue(self, *_: Any, **__: Any) -> None:
        pass

    async def get_underlay_channel(self) -> FakeRawChannel:
        return FakeRawChannel(self)

    async def close(self) -> None:
        self.is_closed = True


class FakeRawChannel:
    """aiormq's channel under ``FakeChannel``: where the notifier publishes."""

    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    @property
    def is_closed(self) -> bool:
        return self.channel.is_closed

    async def basic_publish(self, body: bytes, *, routing_key: str, **_: Any) -> None:
        await anyio.lowlevel.checkpoint()  # the others are in flight meanwhile
        broker = self.channel.broker
        if broker.lost or self.channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
        if routing_key.startswith("BOOM"):
            if isinstance(broker.error, aiormq.exceptions.AMQPChannelError):
                self.channel.is_closed = True
            if isinstance(broker.error, amqp.CONNECTION_EXCEPTIONS):
                broker.lost = True
            raise broker.error
        broker.published.append(routing_key)


async def relayed(
    types: list[str],
    error: Exception,
    streams: rs.Streams | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> tuple[FakeBroker, rs.Streams]:
    """Relay one entry of outcomes of ``types`` and one undecodable entry."""
    streams = streams or rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    outcomes = [Outcome(str(i), t, Status.SUCCESS, None, 1, "b") for i, t in enumerate(types)]
    await streams.add(names.outcomes, [{"o": work_encoder.encode(outcomes)}, {"o": b"junk"}])
    entries = await streams.read(names.outcomes, rs.NOTIFIER_GROUP, "n", count=10, block_ms=None)
    broker = FakeBroker(error)
    notifier = one_by_one(streams, max_message_bytes)
    publisher = notifier.publisher(broker)  # type: ignore[arg-type]
    await publisher.open()
    await notifier.relay(publisher, entries)
    return broker, streams


def nack() -> aiormq.exceptions.DeliveryError:
    return aiormq.exceptions.DeliveryError(None, spec.Basic.Nack(delivery_tag=3))


def returned() -> aiormq.exceptions.PublishError:
    back = spec.Basic.Return(312, "NO_ROUTE", "events", "BOOM.SUCCESS")
    return aiormq.exceptions.PublishError(
        DeliveredMessage(delivery=back, header=ContentHeader(), body=b"", channel=None),  # type: ignore[arg-type]
        back,
    )


def too_large() -> aiormq.exceptions.ChannelPreconditionFailed:
    return aiormq.exceptions.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - message size 20000 is larger than configured max size 10000"
    )


REFUSALS = [
    pytest.param(nack(), "DeliveryError: Message delivery failed: Basic.Nack", id="nack"),
    pytest.param(returned(), "PublishError: Message delivery failed: Basic.Return", id="return"),
    pytest.param(too_large(), "ChannelPreconditionFailed: PRECONDITION_FAILED", id="406"),
    pytest.param(
        aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no exchange 'x'"),
        "ChannelNotFoundEntity: NOT_FOUND",
        id="404",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("error", "reason"), REFUSALS)
async def test_a_message_the_broker_refuses_is_dead_lettered_with_its_reason_and_the_rest_go(
    error: Exception, reason: str
) -> None:
    broker, streams = await relayed(["A", "BOOM", "B", "C"], error)
    assert sorted(broker.published) == ["A.SUCCESS", "B.SUCCESS", "C.SUCCESS"]
    dead = [f for _, f in await streams.redis.xrange(streams.names.dead) if b"outcomes" in f]
    assert [(f[b"reason"].decode()[: len(reason)], json_ids(f[b"outcomes"])) for f in dead] == [
        (reason, ("1",))
    ]
    assert await streams.length(streams.names.outcomes) == 0, "every entry acked"
    closes_channel = isinstance(error, aiormq.exceptions.AMQPChannelError)
    assert broker.channels == (3 if closes_channel else 1), "a new channel after each close"


@pytest.mark.anyio
async def test_what_rabbitmq_cannot_take_is_dead_lettered_and_the_rest_published() -> None:
    long_type = "é" * 150
    broker, streams = await relayed(
        ["A", long_type, "BOOM", "B"], TypeError("a message-level error")
    )
    assert broker.published == ["A.SUCCESS", "B.SUCCESS"]
    dead = [fields for _, fields in await streams.redis.xrange(streams.names.dead)]
    reasons = sorted(fields[b"reason"].decode() for fields in dead)
    assert reasons[0].startswith("TypeError: a message-level error")
    assert "AMQP allows 255" in reasons[1]
    assert reasons[2].startswith("undecodable outcome entry")
    carried = {json_ids(f[b"outcomes"]) for f in dead if b"outcomes" in f}
    assert carried == {("1",), ("2",)}
    assert await streams.length(streams.names.outcomes) == 0, "every entry acked"


def json_ids(raw: bytes) -> tuple[str, ...]:
    return tuple(o["id"] for o in msgspec.json.decode(raw))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED - broker forced close"),
        aiormq.exceptions.ChannelInvalidStateError("closed"),
        ConnectionResetError("connection reset"),
    ],
    ids=type,
)
async def test_a_connection_error_leaves_the_entries_to_be_read_again(error: Exception) -> None:
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    with pytest.raises((ExceptionGroup, ConnectionError)) as raised:
        await relayed(["A", "BOOM", "B"], error, streams)
    lost = raised.value.exceptions if isinstance(raised.value, ExceptionGroup) else [raised.value]
    assert all(isinstance(exc, amqp.CONNECTION_EXCEPTIONS) for exc in lost)
    assert await streams.length(streams.names.outcomes) == 2
    assert await streams.length(streams.names.dead) == 0


def test_aggregated_events_are_cut_before_big_metas_add_up_past_the_broker_limit() -> None:
    big = "m" * 1_500_000
    outcomes = [Outcome(str(i), "ORDER", Status.SUCCESS, None, 1, "b", big) for i in range(7)]
    pubs = publications(outcomes, ROUTES, "aggregate", "events")
    topic = [p for p in pubs if p.exchange == "events"]
    assert [len(p.outcomes) for p in topic] == [2, 2, 2, 1]
    assert [o.id for p in topic for o in p.outcomes] == [str(i) for i in range(7)]
    assert all(len(p.body) < 4 * 1024 * 1024 for p in pubs)
    assert [len(p.outcomes) for p in pubs if p.exchange is None] == [2, 2, 2, 1]


def test_a_message_above_the_broker_limit_is_unpublishable() -> None:
    limit = 16 * 1024 * 1024
    assert unpublishable(Publication(None, "orders", b"x" * limit, []), limit) is None
    huge = Publication(None, "orders", b"x" * (limit + 1), [])
    assert "above the 16777216 allowed" in (unpublishable(huge, limit) or "")


@pytest.mark.anyio
async def test_a_message_above_the_configured_limit_is_dead_lettered_without_being_sent() -> None:
    broker, streams = await relayed(["A", "B" * 200], TypeError(), max_message_bytes=300)
    assert broker.published == ["A.SUCCESS"]
    dead = [f for _, f in await streams.redis.xrange(streams.names.dead) if b"outcomes" in f]
    assert [json_ids(f[b"outcomes"]) for f in dead] == [("1",)]
    assert b"(STREAMSVC_AMQP_MAX_MESSAGE_BYTES)" in dead[0][b"reason"]


def test_a_lower_broker_limit_cuts_aggregated_events_smaller() -> None:
    outcomes = [
        Outcome(str(i), "ORDER", Status.SUCCESS, None, 1, "b", "m" * 400) for i in range(10)
    ]
    pubs = publications(outcomes, {}, "aggregate", "events", budget=1100)
    assert [len(p.outcomes) for p in pubs] == [2, 2, 2, 2, 2]


class AckFailsOnce(rs.Streams):
    """Redis drops the connection at the first ack; the notifier stops after the second."""

    notifier: Notifier
    acks = 0

    async def ack_with(self, *args: Any, **kwargs: Any) -> None:
        self.acks += 1
        if self.acks == 1:
            raise redis.exceptions.ConnectionError("connection reset")
        await super().ack_with(*args, **kwargs)
        self.notifier.stop()


@pytest.mark.anyio
async def test_redis_away_at_the_ack_means_publishing_again_not_stopping() -> None:
    streams = AckFailsOnce(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    outcome = Outcome("1", "A", Status.SUCCESS, None, 1, "b")
    await streams.add(names.outcomes, [{"o": work_encoder.encode([outcome])}])
    notifier = one_by_one(streams)
    streams.notifier = notifier
    broker = FakeBroker(TypeError())
    await notifier._session(broker)  # type: ignore[arg-type]
    assert broker.published == ["A.SUCCESS", "A.SUCCESS"], "at least once"
    assert await streams.length(names.outcomes) == 0


class MoreAfterFirstAck(rs.Streams):
    """After the first ack another outcome arrives; the notifier stops after the second."""

    notifier: Notifier
    acks = 0

    async def ack_with(self, *args: Any, **kwargs: Any) -> None:
        await super().ack_with(*args, **kwargs)
        self.acks += 1
        if self.acks == 1:
            later = Outcome("9", "LATER", Status.SUCCESS, None, 1, "b")
            await self.add(self.names.outcomes, [{"o": work_encoder.encode([later])}])
        else:
            self.notifier.stop()


@pytest.mark.anyio
@pytest.mark.parametrize(("error", "reason"), REFUSALS)
async def test_after_a_refusal_the_notifier_goes_on_with_the_next_outcomes(
    error: Exception, reason: str
) -> None:
    streams = MoreAfterFirstAck(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    first = [Outcome(str(i), t, Status.SUCCESS, None, 1, "b") for i, t in enumerate(["BOOM", "A"])]
    await streams.add(names.outcomes, [{"o": work_encoder.encode(first)}])
    notifier = one_by_one(streams)
    streams.notifier = notifier
    broker = FakeBroker(error)
    with anyio.fail_after(5):
        await notifier._session(broker)  # type: ignore[arg-type]
    assert broker.published == ["A.SUCCESS", "LATER.SUCCESS"]
    assert await streams.length(names.outcomes) == 0
    dead = [f[b"reason"].decode() for _, f in await streams.redis.xrange(names.dead)]
    assert [r[: len(reason)] for r in dead] == [reason]


@pytest.mark.anyio
async def test_a_connection_lost_while_publishing_ends_the_session_for_a_reconnect() -> None:
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    outcomes = [Outcome(str(i), t, Status.SUCCESS, None, 1, "b") for i, t in enumerate("AB")]
    await streams.add(names.outcomes, [{"o": work_encoder.encode(outcomes)}])
    broker = FakeBroker(aiormq.exceptions.ChannelInvalidStateError("closed"))
    broker.lost = False
    notifier = one_by_one(streams)
    original = FakeRawChannel.basic_publish

    async def cut(self: FakeRawChannel, body: bytes, *, routing_key: str, **_: Any) -> None:
        broker.lost = True  # the connection drops under the first message
        await original(self, body, routing_key=routing_key)

    with pytest.MonkeyPatch.context() as patch, anyio.fail_after(5):
        patch.setattr(FakeRawChannel, "basic_publish", cut)
        with pytest.raises((ExceptionGroup, ConnectionError)):
            await notifier._session(broker)  # type: ignore[arg-type]
    assert await streams.length(names.outcomes) == 1, "left to be read again"


def test_a_cancelled_operation_is_announced_under_its_own_routing_key_in_both_modes() -> None:
    cancelled = [Outcome("x", "ORDER", Status.CANCELLED, None, 0, None, None, "u-x")]
    [one] = decoded(publications(cancelled, {}, "operation", "events"))
    assert one[:2] == ("events", "ORDER.CANCELLED")
    assert one[2] == {
        "pattern": "batch_operation_finished",
        "data": {
            "id": "x",
            "operationType": "ORDER",
            "status": "CANCELLED",
            "error": None,
            "attempts": 0,
            "batchId": None,
            "meta": None,
            "userOperationId": "u-x",
        },
    }
    [grouped] = decoded(publications(cancelled, {}, "aggregate", "events"))
    assert grouped[:2] == ("events", "ORDER.CANCELLED")
    assert grouped[2] == {
        "pattern": "batch_operations_finished",
        "data": {
            "operationType": "ORDER",
            "success": [],
            "failed": [{"id": "x", "error": "cancelled", "meta": None, "userOperationId": "u-x"}],
        },
    }
