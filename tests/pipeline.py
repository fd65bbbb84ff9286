"""Helpers that drive a Service in-process: start its committers, drain its flushers."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import aio_pika
import anyio
import asyncpg
import httpx
import msgspec

from benchmarks.harness import PG
from streamsvc.model import Operation
from streamsvc.settings import Settings
from streamsvc.supervisor import Service, open_service
from tests.nest import NestClient, nest_client


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """A service whose ingress committers run in the background."""
    async with open_service(settings) as service, anyio.create_task_group() as tg:
        tg.start_soon(service.ingress.run)
        try:
            yield service
        finally:
            tg.cancel_scope.cancel()


async def drain(service: Service) -> None:
    """Run every flusher until the work stream has nothing left for them."""
    async with anyio.create_task_group() as tg:
        for flusher in service.flushers:
            tg.start_soon(functools.partial(flusher.run, burst=True))


def ops(raw: Sequence[Mapping[str, object]]) -> list[Operation]:
    return msgspec.convert(raw, list[Operation])


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 30.0, every: float = 0.05
) -> None:
    """Wait until ``check()`` is true, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await anyio.sleep(every)


async def until_applied(conn: Any, *, by: str, value: str, within: float = 15) -> None:
    """Wait until the operation whose ``by`` column (``id`` or ``user_operation_id``) is
    ``value`` has succeeded."""
    assert by in ("id", "user_operation_id")

    async def done() -> bool:
        status = await conn.fetchval(
            f'SELECT status FROM "BatchOperations" WHERE {by} = $1::uuid', value
        )
        return bool(status == "SUCCESS")

    await eventually(done, within=within)


async def statuses(conn: object) -> dict[str, int]:
    rows = await conn.fetch(  # type: ignore[attr-defined]
        'SELECT status, count(*) FROM "BatchOperations" GROUP BY status'
    )
    return {r[0]: r[1] for r in rows}


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Service]:
    """Everything but the signal watcher and the sweeper: committers, RPC, HTTP, flushers,
    notifier, scheduler."""
    async with open_service(settings) as service, anyio.create_task_group() as tg:
        tg.start_soon(service.ingress.run)
        tg.start_soon(service.rpc.run)
        for notifier in service.notifiers:
            tg.start_soon(notifier.run)
        tg.start_soon(service.scheduler.run)
        http_done = anyio.Event()

        async def serve_http() -> None:
            try:
                await service.http.serve()
            finally:
                http_done.set()

        tg.start_soon(serve_http)
        for flusher in service.flushers:
            tg.start_soon(flusher.run)

        async def listening() -> bool:
            return bool(service.http.started)

        await eventually(listening, within=10, every=0.01)
        try:
            yield service
        finally:
            service.stop_claiming()
            with anyio.move_on_after(5):  # let uvicorn close its sockets
                await http_done.wait()
            tg.cancel_scope.cancel()


class Served(NamedTuple):
    """A serving service with a client for each of its doors and its database."""

    service: Service
    db: asyncpg.Connection
    http: httpx.AsyncClient
    rpc: NestClient


@asynccontextmanager
async def served_with_clients(settings: Settings) -> AsyncIterator[Served]:
    """``serving(settings)``, plus an HTTP client on its port, a NestJS-style RPC client on
    its queue and a connection to its database."""
    db = await asyncpg.connect(database=settings.db_name, **PG)
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with (
            nest_client(settings.rmq_queue) as rpc,
            serving(settings) as service,
            httpx.AsyncClient(base_url=base) as http,
        ):
            yield Served(service, db, http, rpc)
    finally:
        await db.close()


async def post_batch(served: Served, *bodies: dict[str, Any]) -> list[str]:
    """POST ``bodies`` in one bulk request (every one must be stored); their ids."""
    response = await served.http.post("/api/operations/batch", json=list(bodies))
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()]


async def events_on(served: Served, routing_key: str) -> aio_pika.abc.AbstractQueue:
    """An exclusive queue of the outcome events ``routing_key`` selects on the service's
    topic exchange (declared here if the notifier has not yet)."""
    channel = served.rpc.channel
    exchange = await channel.declare_exchange(
        served.service.settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    events = await channel.declare_queue(exclusive=True)
    await events.bind(exchange, routing_key=routing_key)
    return events


def order(i: int, **extra: Any) -> dict[str, Any]:
    """A structured insert into the workload's orders table."""
    return {
        "operationType": "ORDER_CREATED",
        "table": "orders",
        "action": "insert",
        "values": {"id": i, "customer": "c", "amount": 1},
        **extra,
    }
