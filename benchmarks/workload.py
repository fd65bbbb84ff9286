"""A mixed, checkable workload: every effect can be verified as applied exactly once."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import asyncpg

SEEDED_BASE = 1_000_000  # orders that exist before the run: updated or deleted by it
COUNTERS = 50
POISON = 0.01  # share of operations that must fail: they break a CHECK constraint
INCREMENT_SQL = "UPDATE counters SET value = value + 1 WHERE name = $1"

SCHEMA = """
CREATE TABLE orders (
    id integer PRIMARY KEY,
    customer text NOT NULL,
    amount numeric(12, 2) NOT NULL CHECK (amount >= 0),
    note text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE payments (
    id bigint PRIMARY KEY,
    order_id integer NOT NULL,
    amount numeric(12, 2) NOT NULL,
    paid_at timestamptz
);
CREATE TABLE counters (
    name text PRIMARY KEY,
    value integer NOT NULL
);
-- not on the allow-list: operations naming it are refused
CREATE TABLE secrets (id integer PRIMARY KEY, secret text);
CREATE TABLE profiles (id integer PRIMARY KEY, name text, password_hash text);
"""
ALLOWED = "orders, payments, counters"


@dataclass
class Workload:
    ops: list[dict[str, Any]] = field(default_factory=list)
    inserted_orders: list[int] = field(default_factory=list)
    inserted_payments: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    upserted: dict[str, int] = field(default_factory=dict)
    poisoned: list[int] = field(default_factory=list)
    increments: int = 0
    seeded: int = 0
    hot: dict[str, int] = field(default_factory=dict)  # hot row -> its count of updates
    ordered: bool = False  # whether the hot rows' updates carry their orderingKey


def build(n: int, *, seed: int = 7) -> Workload:
    """``n`` operations: inserts into two tables, updates, upserts, deletes, statements,
    and 1% poison."""
    rng = random.Random(seed)
    w = Workload()
    w.seeded = max(1, n // 5)
    seeded = list(range(SEEDED_BASE, SEEDED_BASE + w.seeded))
    rng.shuffle(seeded)
    for i in range(n):
        roll = rng.random()
        if roll < POISON:  # breaks the orders CHECK: must end FAIL, alone
            w.poisoned.append(i)
            w.ops.append(
                _op(
                    "ORDER_CREATED",
                    "orders",
                    "insert",
                    values={"id": i, "customer": f"c{i % 97}", "amount": -1},
                )
            )
        elif roll < 0.5 or not seeded:
            w.inserted_orders.append(i)
            w.ops.append(
                _op(
                    "ORDER_CREATED",
                    "orders",
                    "insert",
                    values={"id": i, "customer": f"c{i % 97}", "amount": i % 500 + 0.5},
                )
            )
        elif roll < 0.65:
            w.inserted_payments.append(i)
            w.ops.append(
                _op(
                    "PAYMENT_RECORDED",
                    "payments",
                    "insert",
                    values={
                        "id": i,
                        "order_id": i,
                        "amount": "12.34",
                        "paid_at": "2026-11-29T10:00:00Z",
                    },
                )
            )
        elif roll < 0.75:
            target = seeded.pop()
            w.updated.append(target)
            w.ops.append(
                _op(
                    "ORDER_NOTED",
                    "orders",
                    "update",
                    values={"note": f"n{target}"},
                    key={"id": target},
                )
            )
        elif roll < 0.80:
            target = seeded.pop()
            w.deleted.append(target)
            w.ops.append(_op("ORDER_DELETED", "orders", "delete", key={"id": target}))
        elif roll < 0.90:
            name = f"u{i}"
            w.upserted[name] = i
            w.ops.append(
                _op("COUNTER_SET", "counters", "upsert", values={"value": i}, key={"name": name})
            )
        else:
            w.increments += 1
            w.ops.append(
                {
                    "operationType": "COUNTER_BUMPED",
                    "sql": INCREMENT_SQL,
                    "params": [f"k{i % COUNTERS}"],
                }
            )
    return w


def with_hot_keys(
    n: int, *, keys: int, share: float = 0.1, ordered: bool, seed: int = 7
) -> Workload:
    """``build``'s workload of ``n`` operations, ``share`` of them updates of ``keys`` hot
    counters rows (``UPDATE counters SET value = <its count so far> WHERE name = 'h<k>'``,
    keys taking turns), spread evenly through it; under the orderingKey of their row when
    ``ordered``. In order, every hot row ends on its count of updates."""
    keyed = round(n * share)
    w = build(n - keyed, seed=seed)
    rows = [f"h{k}" for k in range(keys)]
    updates = [
        {
            "operationType": "HOT_SET",
            "table": "counters",
            "action": "update",
            "values": {"value": i // keys + 1},
            "key": {"name": rows[i % keys]},
            **({"orderingKey": rows[i % keys]} if ordered else {}),
        }
        for i in range(keyed)
    ]
    at = {int((j + 0.5) * n / keyed) for j in range(keyed)} if keyed else set()
    rest, hot = iter(w.ops), iter(updates)
    w.ops = [next(hot) if i in at else next(rest) for i in range(n)]
    w.hot = {row: keyed // keys + (k < keyed % keys) for k, row in enumerate(rows)}
    w.ordered = ordered
    return w


def _op(kind: str, table: str, action: str, **body: Any) -> dict[str, Any]:
    return {"operationType": kind, "table": table, "action": action, **body}


async def seed(conn: asyncpg.Connection, w: Workload) -> None:
    await conn.executemany(
        "INSERT INTO orders (id, customer, amount) VALUES ($1, 'seed', 1)",
        [(i,) for i in range(SEEDED_BASE, SEEDED_BASE + w.seeded)],
    )
    await conn.executemany(
        "INSERT INTO counters (name, value) VALUES ($1, 0)",
        [(f"k{i}",) for i in range(COUNTERS)] + [(row,) for row in w.hot],
    )


async def verify(conn: asyncpg.Connection, w: Workload) -> None:
    """Assert every effect landed exactly once."""
    orders = {r[0] for r in await conn.fetch("SELECT id FROM orders WHERE id < $1", SEEDED_BASE)}
    assert orders == set(w.inserted_orders)  # and none of the poisoned ones
    payments = await conn.fetchval("SELECT count(*) FROM payments")
    assert payments == len(w.inserted_payments)
    noted = await conn.fetch("SELECT id, note FROM orders WHERE id = ANY($1::int[])", w.updated)
    assert {r[0]: r[1] for r in noted} == {i: f"n{i}" for i in w.updated}
    left = await conn.fetchval("SELECT count(*) FROM orders WHERE id = ANY($1::int[])", w.deleted)
    assert left == 0
    upserted = await conn.fetch("SELECT name, value FROM counters WHERE name LIKE 'u%'")
    assert {r[0]: r[1] for r in upserted} == w.upserted
    bumped = await conn.fetchval("SELECT sum(value) FROM counters WHERE name LIKE 'k%'")
    assert bumped == w.increments
    if w.hot:  # in order, each ends on its last update; else on one of them
        hot = await conn.fetch("SELECT name, value FROM counters WHERE name = ANY($1)", list(w.hot))
        got = {r[0]: r[1] for r in hot}
        if w.ordered:
            assert got == w.hot, {k: (v, w.hot[k]) for k, v in got.items() if v != w.hot[k]}
        else:
            assert set(got) == set(w.hot) and all(1 <= v <= w.hot[k] for k, v in got.items())


def expected_statuses(w: Workload) -> dict[str, int]:
    """How streamsvc must finish ``w``: the poisoned operations FAIL, the rest SUCCESS."""
    counts = {"SUCCESS": len(w.ops) - len(w.poisoned), "FAIL": len(w.poisoned)}
    return {status: n for status, n in counts.items() if n}


async def verify_statuses(conn: asyncpg.Connection, w: Workload) -> None:
    """Assert streamsvc finished every operation as ``expected_statuses`` says."""
    rows = await conn.fetch('SELECT status, count(*) FROM "BatchOperations" GROUP BY status')
    assert {r[0]: r[1] for r in rows} == expected_statuses(w)
