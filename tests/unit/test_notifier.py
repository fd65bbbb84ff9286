from typing import Any

import aio_pika
import aiormq
import fakeredis
import msgspec
import pytest
import redis.exceptions

from streamsvc.actors.notifier import Notifier, Publication, publications, unpublishable
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
    reason = unpublishable(Publication("events", key, b"{}", []))
    assert (reason is not None) is refused
    assert reason is None or "AMQP allows 255" in reason


def one_by_one(streams: rs.Streams) -> Notifier:
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
    )


class FakeExchange:
    """Takes every message but those whose routing key starts with ``fail``."""

    def __init__(self, fail: str, error: Exception) -> None:
        self.fail, self.error = fail, error
        self.published: list[str] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        if routing_key.startswith(self.fail):
            raise self.error
        self.published.append(routing_key)


async def relayed(
    types: list[str], error: Exception, streams: rs.Streams | None = None
) -> tuple[FakeExchange, rs.Streams]:
    """Relay one entry of outcomes of ``types`` and one undecodable entry."""
    streams = streams or rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    outcomes = [Outcome(str(i), t, Status.SUCCESS, None, 1, "b") for i, t in enumerate(types)]
    await streams.add(names.outcomes, [{"o": work_encoder.encode(outcomes)}, {"o": b"junk"}])
    entries = await streams.read(names.outcomes, rs.NOTIFIER_GROUP, "n", count=10, block_ms=None)
    exchange = FakeExchange("BOOM", error)
    notifier = one_by_one(streams)
    await notifier.relay({"events": exchange, None: exchange}, entries)  # type: ignore[dict-item]
    return exchange, streams


@pytest.mark.anyio
async def test_what_rabbitmq_cannot_take_is_dead_lettered_and_the_rest_published() -> None:
    long_type = "é" * 150
    exchange, streams = await relayed(
        ["A", long_type, "BOOM", "B"], TypeError("a message-level error")
    )
    assert exchange.published == ["A.SUCCESS", "B.SUCCESS"]
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
async def test_a_connection_error_leaves_the_entries_to_be_read_again() -> None:
    streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    with pytest.raises(ExceptionGroup):
        await relayed(["BOOM"], aiormq.exceptions.ChannelInvalidStateError("closed"), streams)
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
    huge = Publication(None, "orders", b"x" * (16 * 1024 * 1024 + 1), [])
    assert "above the 16777216 allowed" in (unpublishable(huge) or "")


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


class FakeChannel:
    def __init__(self, exchange: FakeExchange) -> None:
        self.default_exchange = exchange

    async def declare_exchange(self, *_: Any, **__: Any) -> FakeExchange:
        return self.default_exchange


class FakeConnection:
    def __init__(self, exchange: FakeExchange) -> None:
        self.exchange = exchange

    async def channel(self, **_: Any) -> FakeChannel:
        return FakeChannel(self.exchange)


@pytest.mark.anyio
async def test_redis_away_at_the_ack_means_publishing_again_not_stopping() -> None:
    streams = AckFailsOnce(fakeredis.FakeAsyncRedis(), rs.Names("t"))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    outcome = Outcome("1", "A", Status.SUCCESS, None, 1, "b")
    await streams.add(names.outcomes, [{"o": work_encoder.encode([outcome])}])
    notifier = one_by_one(streams)
    streams.notifier = notifier
    exchange = FakeExchange("never", TypeError())
    await notifier._session(FakeConnection(exchange))  # type: ignore[arg-type]
    assert exchange.published == ["A.SUCCESS", "A.SUCCESS"], "at least once"
    assert await streams.length(names.outcomes) == 0
