"""Tracing (streamsvc.tracing) through the three doors, with the SDK's in-memory exporter:
a caller's traceparent is the parent of its request's intake span, whose context is stored
with the operation; the batch span links to it; the outcome's publish span is its child
and travels in the event's AMQP headers. Hostile values are ignored; off, nothing traces."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractQueue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind

from streamsvc import tracing
from streamsvc.settings import Settings
from tests.pipeline import Served, eventually, order

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.fixture
async def events(served: Served, settings: Settings) -> AsyncIterator[AbstractQueue]:
    """A queue bound to every outcome event of the topic exchange."""
    channel = served.rpc.channel
    exchange = await channel.declare_exchange(
        settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    yield queue


def caller_traceparent() -> tuple[str, int, int]:
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


async def next_event(queue: AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    with anyio.fail_after(15):
        while True:
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
                return message
            await anyio.sleep(0.05)


def same(a: SpanContext, b: SpanContext) -> bool:
    return (a.trace_id, a.span_id) == (b.trace_id, b.span_id)


async def follows_the_caller(
    exporter: InMemorySpanExporter,
    queue: AbstractQueue,
    trace_id: int,
    parent_span_id: int,
    op_id: str,
) -> None:
    """The caller's trace holds the intake span (its child), the batch span links to the
    intake span, the publish span is the intake span's child, and its context is the
    event's traceparent header."""
    message = await next_event(queue)
    assert op_id in json.dumps(json.loads(message.body))
    headers = message.headers or {}
    header = headers["traceparent"]
    header = header.decode() if isinstance(header, bytes) else str(header)

    def named(name: str) -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name == name]

    async def all_ended() -> bool:
        return bool(named("intake") and named("batch") and named("publish"))

    await eventually(all_ended, within=5)
    (intake,) = [s for s in named("intake") if s.context.trace_id == trace_id]
    assert intake.parent is not None and intake.parent.span_id == parent_span_id
    assert op_id in (intake.attributes or {})["streamsvc.operation.ids"]  # type: ignore[operator]
    (batch,) = [
        b for b in named("batch") if any(same(link.context, intake.context) for link in b.links)
    ]
    assert batch.context.trace_id != trace_id  # a root of its own, linked to each operation
    (publish,) = [p for p in named("publish") if p.context.trace_id == trace_id]
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None and publish.parent.span_id == intake.context.span_id
    assert header == tracing.traceparent(publish.context)
    assert (batch.attributes or {})["streamsvc.batch.id"] in (publish.attributes or {})[
        "streamsvc.batch.ids"
    ]  # type: ignore[operator]


async def test_http_a_callers_traceparent_follows_its_operation_to_the_outcome_event(
    spans: InMemorySpanExporter, served: Served, events: AbstractQueue
) -> None:
    traceparent, trace_id, span_id = caller_traceparent()
    response = await served.http.post(
        "/api/operations", json=order(1), headers={"traceparent": traceparent}
    )
    assert response.status_code == 201, response.text
    op_id = response.json()["id"]
    await follows_the_caller(spans, events, trace_id, span_id, op_id)
    stored = await served.http.get(f"/api/operations/{op_id}")
    assert f"{trace_id:032x}" in stored.json()["operation"]["traceparent"]


async def test_rpc_a_callers_traceparent_in_the_amqp_headers_follows_its_operation(
    spans: InMemorySpanExporter, served: Served, events: AbstractQueue
) -> None:
    traceparent, trace_id, span_id = caller_traceparent()
    request_id = "r-1"
    body = {"pattern": "createOperation", "data": order(2), "id": request_id}
    # NestJS's ClientRMQ sends its message headers as AMQP headers
    await served.rpc.publish(
        json.dumps(body).encode(), request_id, headers={"traceparent": traceparent}
    )
    reply = await served.rpc.reply(request_id)
    op_id = reply["response"]["data"]["id"]
    await follows_the_caller(spans, events, trace_id, span_id, op_id)


async def test_inbox_a_traceparent_field_beside_op_follows_its_operation(
    spans: InMemorySpanExporter, served: Served, events: AbstractQueue, redis: Any
) -> None:
    traceparent, trace_id, span_id = caller_traceparent()
    names = served.service.streams.names
    op = order(3, userOperationId="6f1d7c1e-0f7d-4c1a-9f43-6a8b1f6a3c10")
    await redis.xadd(names.inbox, {"op": json.dumps(op), "traceparent": traceparent})
    await served.service.inbox.run(burst=True)
    await follows_the_caller(spans, events, trace_id, span_id, op["userOperationId"])


HOSTILE = [
    "",
    "garbage",
    "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # all-zero trace id
    "00-" + "1" * 32 + "-" + "0" * 16 + "-01",  # all-zero span id
    "ff-" + "1" * 32 + "-" + "1" * 16 + "-01",  # the forbidden version
    "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # upper case
    "00-" + "1" * 32 + "-" + "1" * 16 + "-01" + "x" * 8_000,  # long
    "00-\u00e9" + "1" * 31 + "-" + "1" * 16 + "-01",
]


async def test_hostile_traceparents_are_ignored_and_nothing_of_them_is_stored(
    spans: InMemorySpanExporter, served: Served, redis: Any
) -> None:
    ids: list[str] = []
    for n, value in enumerate(HOSTILE):
        body = order(100 + n, traceparent="00-" + "1" * 32 + "-" + "1" * 16 + "-01")
        response = await served.http.post(
            "/api/operations", json=body, headers={b"traceparent": value.encode("utf-8")}
        )
        assert response.status_code == 201, response.text  # the body's value is not the caller's
        ids.append(response.json()["id"])
        await redis.xadd(
            served.service.streams.names.inbox,
            {"op": json.dumps(order(200 + n)), "traceparent": value, "tracestate": value},
        )
    await served.service.inbox.run(burst=True)
    intakes = [s for s in spans.get_finished_spans() if s.name == "intake"]
    assert len(intakes) == 2 * len(HOSTILE)
    assert all(s.parent is None for s in intakes), "a hostile value became a parent"
    rows = await served.db.fetch("""SELECT body ->> 'traceparent' FROM "BatchOperations" """)
    assert len(rows) == 2 * len(HOSTILE)
    own = {tracing.traceparent(s.context) for s in intakes}
    assert {r[0] for r in rows} == own  # each its own new trace's, nothing the caller sent


async def test_tracing_off_installs_nothing_and_stores_no_context(
    served: Served, events: AbstractQueue
) -> None:
    assert tracing.tracer is None and not tracing.configure(max_links=10, environ={})
    traceparent, _, _ = caller_traceparent()
    response = await served.http.post(
        "/api/operations", json=order(5), headers={"traceparent": traceparent}
    )
    message = await next_event(events)
    assert "traceparent" not in (message.headers or {})
    stored = await served.http.get(f"/api/operations/{response.json()['id']}")
    assert "traceparent" not in stored.json()["operation"]
