"""Latency at a fixed offered rate: submit -> SUCCESS, per operation, in milliseconds.

Open loop: request i is sent i * size / rate seconds after the start, answered or not, so
a slow answer delays no later submission (a closed loop would hide queueing). The sender
wakes once per tick (5 ms) and sends what has come due; waking every millisecond took
three times the CPU, which the service shares here. Every operation carries a
userOperationId; the wall time (time.time()) it was sent at is kept here.
SUCCESS is when a caller learns of it: the arrival of the outcome event that names it, on
a queue bound to the service's events exchange. That is after the commit (a time taken
inside the transaction would be too early), and includes the notifier's relay.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import anyio
import msgspec
from aio_pika.abc import AbstractIncomingMessage

from benchmarks import scenarios, workload
from benchmarks.harness import RMQ_URL
from benchmarks.scenarios import Ingress, Op
from benchmarks.stage import (
    batch_sizes,
    cpu_per_op,
    cpu_share,
    cpu_used,
    finished,
    stage,
    watch,
)

_events = msgspec.json.Decoder()

# The legs of an operation's way (see `stages`), as the tables name them.
LEGS = {"stored": "submit→stored", "claimed": "stored→claimed", "event": "claimed→event"}
# Where a caller waits for its answer (RPC, HTTP): its key in "stages", and its heading.
REPLY_KEY, REPLY = "reply", "submit→answer"


TICK_S = 0.005


async def offer(
    ingress: Ingress,
    ops: list[Op],
    rate: float,
    *,
    tick_s: float = TICK_S,
    answered: dict[str, float] | None = None,
) -> dict[str, float]:
    """Submit ``ops`` at ``rate`` operations a second, waking at most once per ``tick_s``;
    the submit wall time of each, by userOperationId. Returns once every request was
    answered; ``answered`` gets the wall time each answer came (by userOperationId)."""
    size = 1 if ingress.coalesce else ingress.size
    units = list(scenarios.chunks(ops, size))
    submitted: dict[str, float] = {}
    started = time.perf_counter()
    sent = 0

    async def request(unit: list[Op]) -> None:
        await ingress.request(unit)
        if answered is not None:
            now = time.time()
            answered.update((op["userOperationId"], now) for op in unit)

    async with anyio.create_task_group() as tg:
        while sent < len(units):
            due = min(len(units), math.floor((time.perf_counter() - started) * rate / size) + 1)
            batch, sent = units[sent:due], due
            wall = time.time()
            submitted.update((op["userOperationId"], wall) for unit in batch for op in unit)
            if ingress.coalesce:  # one inbox pipeline for everything due now
                tg.start_soon(request, [op for unit in batch for op in unit])
            else:
                for unit in batch:
                    tg.start_soon(request, unit)
            next_due = started + sent * size / rate
            await anyio.sleep(max(tick_s, next_due - time.perf_counter()))
    return submitted


def percentiles(ms: list[float]) -> dict[str, float]:
    """p50, p95 and p99 (inclusive method: they lie within the data)."""
    if len(ms) < 2:
        return dict.fromkeys(("p50", "p95", "p99"), round(ms[0], 1) if ms else math.nan)
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": round(cuts[49], 1), "p95": round(cuts[94], 1), "p99": round(cuts[98], 1)}


async def measure(
    name: str,
    rate: float,
    seconds: float,
    *,
    flushers: int,
    limit: int,
    roles: list[str],
    progress: Callable[[str, int], Callable[[int], None]],
) -> dict[str, Any]:
    """Offer ingress ``name`` ``rate`` operations a second for ``seconds`` on a fresh stage;
    {"rate", "p50", "p95", "p99"} of submit -> SUCCESS in ms, with "stages" (the same
    percentiles of each leg, see `stages`), "cpu" (percent of one core each process used
    meanwhile: the service's, the servers' and this bench's), "cpu_us" (the same in
    microseconds per operation, see `stage.cpu_per_op`) and "mean_batches" (the mean
    operations per intake, flush and relay, see `stage.batch_sizes`)."""
    w = workload.build(max(2, round(rate * seconds)))
    ops = [{**op, "userOperationId": str(uuid.uuid4())} for op in w.ops]
    async with stage(w, flushers, limit, roles) as st:
        update = progress(f"{name} latency at {rate:,.0f} ops/s", len(ops))
        expected = len(ops) - len(w.poisoned)
        async with (
            succeeded(f"{st.prefix}-events", expected) as arrivals,
            scenarios.connect(name, **st.ingress()) as ingress,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(watch, st, update)
            cpu_before, started = cpu_used(st), time.perf_counter()
            answered: dict[str, float] = {}
            submitted = await offer(ingress, ops, rate, answered=answered)
            await finished(st, inbox=name == "inbox")
            with anyio.move_on_after(30):  # the last events are still on their way
                await arrivals.complete.wait()
            cpu_after = cpu_used(st)
            cpu = cpu_share(cpu_before, cpu_after, time.perf_counter() - started)
            cpu_us = cpu_per_op(cpu_before, cpu_after, len(ops))
            batches = await batch_sizes(st)
            tg.cancel_scope.cancel()
        update(len(ops))
        await workload.verify(st.conn, w)
        await workload.verify_statuses(st.conn, w)
        stored = await st.conn.fetch(STORED_AND_CLAIMED)
    arrived = arrivals.times
    assert len(arrived) == expected, f"{expected - len(arrived)} outcome events never came"
    ms = [(arrived[op_id] - submitted[op_id]) * 1000 for op_id in arrived]
    legs = stages(submitted, {op_id: (s, c) for op_id, s, c in stored}, arrived)
    if not ingress.coalesce:  # a caller waits for each answer (the inbox's is its XADD)
        legs[REPLY_KEY] = percentiles([(answered[i] - submitted[i]) * 1000 for i in answered])
    return {
        "rate": round(rate),
        **percentiles(ms),
        "stages": legs,
        "cpu": cpu,
        "cpu_us": cpu_us,
        "mean_batches": batches,
    }


# When each operation was stored (the intake transaction's start) and claimed (inside the
# batch transaction that applied it), as Unix times.
STORED_AND_CLAIMED = """
SELECT id::text, extract(epoch FROM created_at)::float8, extract(epoch FROM processed_at)::float8
FROM "BatchOperations" WHERE status = 'SUCCESS'
"""


def stages(
    submitted: dict[str, float],
    stored: dict[str, tuple[float, float]],
    arrived: dict[str, float],
) -> dict[str, dict[str, float]]:
    """Where the time goes, by operation id: submit -> stored in BatchOperations (ingress),
    stored -> claimed by a batch transaction (the work stream and the flushers' queue),
    claimed -> its event arrived (the rest of the transaction, the outcome stream, the
    notifier and RabbitMQ); percentiles of each in ms."""
    legs: dict[str, list[float]] = {"stored": [], "claimed": [], "event": []}
    for op_id, event in arrived.items():
        stored_at, claimed_at = stored[op_id]
        legs["stored"].append((stored_at - submitted[op_id]) * 1000)
        legs["claimed"].append((claimed_at - stored_at) * 1000)
        legs["event"].append((event - claimed_at) * 1000)
    return {leg: percentiles(ms) for leg, ms in legs.items()}


@dataclass
class Arrivals:
    """Arrival wall time of every operation id reported as succeeded."""

    expected: int
    times: dict[str, float] = field(default_factory=dict)
    complete: anyio.Event = field(default_factory=anyio.Event)

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        data = _events.decode(message.body)["data"]
        self.times.update((s["id"], now) for s in data.get("success", ()))
        if len(self.times) >= self.expected:
            self.complete.set()


@asynccontextmanager
async def succeeded(exchange_name: str, expected: int) -> AsyncIterator[Arrivals]:
    """The service's outcome events, on a queue of our own bound to its exchange, while
    the context is open."""
    arrivals = Arrivals(expected)
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        await queue.consume(arrivals.on_event, no_ack=True)
        yield arrivals
