"""The fault suite's workload and its one checker (tests/e2e/test_faults.py).

Every operation carries a userOperationId derived from the scenario and its number, so the
checker finds each one however it was submitted and whatever happened meanwhile. Half are
inserts into `orders` (one row each: a lost one shows as a missing row), half increments of
50 counters (a twice-applied one shows in their sum), and one in a hundred is poison (an
insert the CHECK refuses: it must end FAIL, with the constraint's name in its error, and
nothing of it applied). Outcome events are collected from a queue bound to the events
exchange: every finished operation must be announced at least once.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import aio_pika
import asyncpg

from benchmarks.harness import RMQ_URL
from benchmarks.workload import INCREMENT_SQL

COUNTERS = 50
POISON_EVERY = 100
_NAMESPACE = uuid.UUID("6f4c2b1e-9d7a-4e3b-8c5f-1a2b3c4d5e6f")


def user_id(scenario: str, n: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{scenario}:{n}"))


def is_poison(n: int) -> bool:
    return n % POISON_EVERY == POISON_EVERY - 1


def operation(scenario: str, n: int) -> dict[str, Any]:
    """Operation ``n`` of a scenario's workload."""
    ids = {"userOperationId": user_id(scenario, n)}
    if is_poison(n):
        values = {"id": n, "customer": "poison", "amount": -1}
        return {"operationType": "FAULT_POISON", "table": "orders", "action": "insert",
                "values": values, **ids}  # fmt: skip
    if n % 2 == 0:
        values = {"id": n, "customer": "c", "amount": 1}
        return {"operationType": "FAULT_ORDER", "table": "orders", "action": "insert",
                "values": values, **ids}  # fmt: skip
    return {"operationType": "FAULT_BUMP", "sql": INCREMENT_SQL,
            "params": [f"f{n % COUNTERS}"], **ids}  # fmt: skip


def workload(scenario: str, n: int) -> list[dict[str, Any]]:
    return [operation(scenario, i) for i in range(n)]


async def seed(conn: asyncpg.Connection) -> None:
    await conn.executemany(
        "INSERT INTO counters (name, value) VALUES ($1, 0)", [(f"f{i}",) for i in range(COUNTERS)]
    )


@dataclass
class Events:
    """Outcome events received, by userOperationId."""

    seen: Counter[str] = field(default_factory=Counter)

    def take(self, body: bytes) -> None:
        data = json.loads(body).get("data", {})
        for item in [data] if "userOperationId" in data else [
            *data.get("success", []), *data.get("failed", [])
        ]:  # fmt: skip
            if item.get("userOperationId"):
                self.seen[item["userOperationId"]] += 1


@asynccontextmanager
async def collecting(exchange: str) -> AsyncIterator[Events]:
    """Every outcome event published to the topic ``exchange`` while inside. The queue is
    durable, so what is published while the broker comes back after a stop is kept for the
    collector's reconnection."""
    events = Events()
    connection = await aio_pika.connect_robust(RMQ_URL)
    try:
        channel = await connection.channel()
        topic = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"{exchange}-checker", durable=True)
        await queue.bind(topic, routing_key="#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                events.take(message.body)

        await queue.consume(on_message)
        try:
            yield events
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


@dataclass
class Tally:
    """One scenario's line of the fault table."""

    scenario: str
    submitted: int
    applied_once: int = 0  # SUCCESS, its effect there once
    failed_with_reason: int = 0  # the poison, FAIL naming the constraint
    lost: int = 0  # never stored, never finished, or its effect missing
    duplicated: int = 0  # stored twice, or its effect applied more than once
    unexpected: int = 0  # ended otherwise than it should (a good one FAIL, say)
    notified: int = 0  # finished and announced at least once
    notified_twice: int = 0  # announced more than once (at least once is the promise)

    @property
    def clean(self) -> bool:
        finished = self.applied_once + self.failed_with_reason
        return (
            finished == self.submitted
            and not (self.lost or self.duplicated or self.unexpected)
            and self.notified == finished
        )

    def row(self) -> dict[str, Any]:
        return asdict(self)


async def check(
    conn: asyncpg.Connection, scenario: str, n: int, events: Events | None = None
) -> Tally:
    """Compare what was submitted with what PostgreSQL holds and what was announced."""
    tally = Tally(scenario, n)
    wanted = {user_id(scenario, i): i for i in range(n)}
    rows = await conn.fetch(
        """SELECT user_operation_id::text AS uid, status, error FROM "BatchOperations"
           WHERE user_operation_id = ANY($1::uuid[])""",
        list(wanted),
    )
    stored = Counter(r["uid"] for r in rows)
    tally.duplicated += sum(count - 1 for count in stored.values())
    tally.lost += n - len(stored)
    orders = {r[0] for r in await conn.fetch("SELECT id FROM orders WHERE customer = 'c'")}
    bumps = 0
    for r in rows:
        i = wanted[r["uid"]]
        status = r["status"]
        if status not in ("SUCCESS", "FAIL", "CANCELLED"):
            tally.lost += 1  # stored, never finished
        elif is_poison(i):
            if status == "FAIL" and "orders_amount_check" in (r["error"] or ""):
                tally.failed_with_reason += 1
            else:
                tally.unexpected += 1
        elif status != "SUCCESS":
            tally.unexpected += 1
        elif i % 2 == 0:
            if i in orders:
                tally.applied_once += 1
            else:
                tally.lost += 1
        else:
            bumps += 1
    total = await conn.fetchval("SELECT coalesce(sum(value), 0) FROM counters WHERE name LIKE 'f%'")
    tally.applied_once += min(bumps, total)
    tally.duplicated += max(0, total - bumps)
    tally.lost += max(0, bumps - total)
    poisoned = await conn.fetchval("SELECT count(*) FROM orders WHERE customer = 'poison'")
    tally.duplicated += poisoned  # a refused insert that landed anyway
    if events is not None:
        finished = {r["uid"] for r in rows if r["status"] in ("SUCCESS", "FAIL")}
        tally.notified = sum(1 for uid in finished if events.seen[uid])
        tally.notified_twice = sum(1 for uid in finished if events.seen[uid] > 1)
    return tally


async def troubles(conn: asyncpg.Connection, scenario: str, n: int) -> list[dict[str, Any]]:
    """The submitted operations that did not end as they should, as they stand: for a
    failure's message."""
    wanted = [user_id(scenario, i) for i in range(n)]
    rows = await conn.fetch(
        """SELECT user_operation_id::text AS uid, status, attempts, error, parked, paused,
                  wake_at, updated_at, now() - updated_at AS untouched
           FROM "BatchOperations"
           WHERE user_operation_id = ANY($1::uuid[])
             AND (status NOT IN ('SUCCESS', 'FAIL')
                  OR (status = 'FAIL') <> (operation_type = 'FAULT_POISON')
                  OR (status = 'FAIL' AND error NOT LIKE '%orders_amount_check%'))""",
        wanted,
    )
    found = [dict(r) for r in rows]
    stored = {
        r[0]
        for r in await conn.fetch(
            """SELECT user_operation_id::text FROM "BatchOperations"
               WHERE user_operation_id = ANY($1::uuid[])""",
            wanted,
        )
    }
    found += [{"uid": uid, "status": "never stored"} for uid in wanted if uid not in stored]
    return found[:20]
