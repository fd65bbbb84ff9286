"""Operations that use priority, runAt (delayMs) and orderingKey, how to check what
streamsvc did with them (docs/scheduling.md) from BatchOperations and the tables, and the
runs of `just bench`'s priority and delayed scenarios (hot-keys is a throughput run of
benchmarks.workload.with_hot_keys).

- priority: a backlog of the mixed workload at priority 0 is stored through the inbox
  while no flusher runs; then the flushers start, and once they have applied a batch's
  worth, probes (single inserts) go in through the inbox one at a time. Each probe's
  latency is stored -> applied (created_at -> processed_at). The same is run with the
  probes at priority 9 and at priority 0, on fresh stages.
- delayed: inserts with delayMs spread over a few seconds, through the inbox, on several
  `streamsvc run` processes (every role each, so several schedulers share the work); the
  lateness of each is processed_at - run_at, and none may be early.

Used by `just bench` and by the tests that run the same things small
(tests/e2e/test_bench.py, test_ordering.py, test_crashes.py).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from benchmarks import latency, workload
from benchmarks.harness import producer
from benchmarks.stage import Stage, finished, stage, watch

Op = dict[str, Any]

PROBE_BASE = 2_000_000  # ids of the probes' orders: above the workload's (benchmarks.workload)
DELAYED_BASE = 3_000_000  # ids of the delayed operations' orders
PROBE_TYPE = "PROBE_CREATED"
DELAYED_TYPE = "DELAYED_CREATED"
KEYED_TYPE = "KEYED_SET"


# -- orderingKey ---------------------------------------------------------------------------
def keyed_update(row: str, seq: int, *, ordered: bool = True) -> Op:
    """``UPDATE counters SET value = seq WHERE name = row``, under the orderingKey ``row``
    (when ``ordered``): applied in order, a row's last value is its last operation's."""
    op: Op = {
        "operationType": KEYED_TYPE,
        "table": "counters",
        "action": "update",
        "values": {"value": seq},
        "key": {"name": row},
    }
    if ordered:
        op["orderingKey"] = row
    return op


def keyed_updates(rows: Sequence[str], per_row: int, *, ordered: bool = True) -> list[Op]:
    """``per_row`` updates of each of ``rows``, values 1 to ``per_row``, interleaved: every
    row's first, then every row's second, and so on."""
    return [
        keyed_update(row, seq, ordered=ordered) for seq in range(1, per_row + 1) for row in rows
    ]


async def seed_rows(conn: asyncpg.Connection, rows: Sequence[str]) -> None:
    """The counters ``rows`` the keyed updates update, at 0."""
    await conn.executemany(
        "INSERT INTO counters (name, value) VALUES ($1, 0)", [(row,) for row in rows]
    )


# Every keyed operation: its key, the value it sets (its place in the key's order), where
# the store put it in the key's order, its status and when its batch claimed it.
KEYED = """
SELECT ordering_key, (body -> 'values' ->> 'value')::int AS seq, key_seq, status,
       processed_at
FROM "BatchOperations" WHERE operation_type = $1 AND ordering_key IS NOT NULL
"""


async def key_order_problems(
    conn: asyncpg.Connection, expected: dict[str, int], *, operation_type: str = KEYED_TYPE
) -> list[str]:
    """What is wrong with the keyed updates, given each row's count of them (its last
    value): every one stored once and SUCCESS, stored in the order sent (key_seq rising
    with the value), applied in that order (processed_at rising with it; each its own
    transaction, so strictly), and the row left on its last value. Empty when all is
    well."""
    problems: list[str] = []
    by_key: dict[str, list[asyncpg.Record]] = {}
    for row in await conn.fetch(KEYED, operation_type):
        by_key.setdefault(row["ordering_key"], []).append(row)
    if set(by_key) != set(expected):
        problems.append(f"keys {sorted(set(by_key) ^ set(expected))[:5]} missing or unexpected")
    for key, rows in sorted(by_key.items()):
        rows.sort(key=lambda r: r["seq"])
        seqs = [r["seq"] for r in rows]
        if seqs != list(range(1, expected.get(key, 0) + 1)):
            problems.append(f"{key}: values stored {_summary(seqs)}")
        if bad := [r["seq"] for r in rows if r["status"] != "SUCCESS"]:
            problems.append(f"{key}: not SUCCESS: values {_summary(bad)}")
            continue
        stored = [a["seq"] for a, b in itertools.pairwise(rows) if a["key_seq"] > b["key_seq"]]
        if stored:
            problems.append(f"{key}: stored after the next one: values {_summary(stored)}")
        applied = [
            a["seq"] for a, b in itertools.pairwise(rows) if a["processed_at"] >= b["processed_at"]
        ]
        if applied:
            problems.append(f"{key}: applied after the next one: values {_summary(applied)}")
    values = dict(
        await conn.fetch("SELECT name, value FROM counters WHERE name = ANY($1)", list(expected))
    )
    wrong = {k: values.get(k) for k, last in expected.items() if values.get(k) != last}
    if wrong:
        sample = ", ".join(f"{k}={v} (not {expected[k]})" for k, v in sorted(wrong.items())[:5])
        problems.append(f"{len(wrong)} rows not on their last value: {sample}")
    return problems


def _summary(values: list[int]) -> str:
    return f"{values[:8]}{' ...' if len(values) > 8 else ''} ({len(values)})"


# -- priority --------------------------------------------------------------------------------
def probes(n: int, priority: int, *, base: int = PROBE_BASE) -> list[Op]:
    """``n`` inserts into orders at ``priority``, ids from ``base``."""
    return [
        {
            "operationType": PROBE_TYPE,
            "table": "orders",
            "action": "insert",
            "values": {"id": base + i, "customer": "probe", "amount": 1},
            "priority": priority,
        }
        for i in range(n)
    ]


# Every operation's claim time, and for the probes their stored -> applied time in ms.
APPLIED = """
SELECT operation_type = $1 AS probe, processed_at,
       extract(epoch FROM processed_at - created_at)::float8 * 1000 AS ms
FROM "BatchOperations" ORDER BY processed_at
"""


@dataclass(frozen=True)
class ProbeFigures:
    latency_ms: dict[str, float]  # p50, p95, p99 of stored -> applied (created_at -> processed_at)
    behind: list[int]  # of each probe, the backlog's operations applied after it
    backlog: int  # the backlog's operations


async def probe_figures(conn: asyncpg.Connection, backlog: int) -> ProbeFigures:
    rows = await conn.fetch(APPLIED, PROBE_TYPE)
    ms, behind, after = [], [], backlog
    for row in rows:  # by claim time: each probe has the backlog still to come behind it
        if row["probe"]:
            ms.append(row["ms"])
            behind.append(after)
        else:
            after -= 1
    return ProbeFigures(latency.percentiles(ms), behind, backlog)


# -- runAt -------------------------------------------------------------------------------------
def delayed(n: int, *, low_ms: int, high_ms: int, seed: int = 11) -> list[Op]:
    """``n`` inserts into orders, each with a delayMs drawn between ``low_ms`` and
    ``high_ms``, ids from DELAYED_BASE."""
    rng = random.Random(seed)
    return [
        {
            "operationType": DELAYED_TYPE,
            "table": "orders",
            "action": "insert",
            "values": {"id": DELAYED_BASE + i, "customer": "later", "amount": 1},
            "delayMs": rng.randint(low_ms, high_ms),
        }
        for i in range(n)
    ]


# How late each operation held for its runAt was applied (claimed by its batch), in ms;
# negative: early.
LATENESS = """
SELECT extract(epoch FROM processed_at - run_at)::float8 * 1000 AS ms, status
FROM "BatchOperations" WHERE run_at IS NOT NULL
"""


@dataclass(frozen=True)
class Lateness:
    ms: list[float]
    early: int
    not_applied: int

    @property
    def percentiles(self) -> dict[str, float]:
        return latency.percentiles(self.ms)


async def lateness(conn: asyncpg.Connection) -> Lateness:
    rows = await conn.fetch(LATENESS)
    ms = [r["ms"] for r in rows if r["status"] == "SUCCESS"]
    return Lateness(ms, sum(m < 0 for m in ms), sum(r["status"] != "SUCCESS" for r in rows))


async def orders_between(conn: asyncpg.Connection, low: int, high: int) -> int:
    """How many orders have an id in [low, high): each insert landed once (the primary key
    would refuse a second, which would then end FAIL)."""
    return int(
        await conn.fetchval("SELECT count(*) FROM orders WHERE id >= $1 AND id < $2", low, high)
    )


# -- the runs --------------------------------------------------------------------------------
Progress = Callable[[str, int], Callable[[int], None]]
BACKLOG_ROLES = ["ingress", "notifier", "sweeper"]  # the flushers start once it is stored
PROBE_EVERY_S = 0.005
STORED = 'SELECT count(*) FROM "BatchOperations"'
FINISHED = """SELECT count(*) FROM "BatchOperations" WHERE status IN ('SUCCESS', 'FAIL')"""
DRAINED = """SELECT extract(epoch FROM max(processed_at) - min(processed_at))::float8
             FROM "BatchOperations" WHERE operation_type <> $1"""
BACKLOG_LEFT = """SELECT count(*) FROM "BatchOperations"
                  WHERE status IN ('UNPROCESSED', 'PROCESSING') AND operation_type <> $1"""


@dataclass(frozen=True)
class ProbeRun:
    band: int
    figures: ProbeFigures
    left: int  # the backlog's operations still pending when the first probe went in
    drain_ops_per_s: float  # the backlog, from its first operation applied to its last


async def probe_run(
    band: int,
    *,
    backlog: int,
    probes_n: int,
    flushers: int,
    limit: int,
    progress: Progress,
    every_s: float = PROBE_EVERY_S,
) -> ProbeRun:
    """One priority run (see the module's docstring): ``backlog`` operations at priority 0
    stored, then ``probes_n`` probes at ``band`` sent ``every_s`` apart while it drains;
    every effect and status checked."""
    w = workload.build(backlog)
    async with stage(w, flushers, limit, BACKLOG_ROLES) as st:
        update = progress(f"priority: {probes_n} at {band} behind {backlog:,} at 0", backlog)
        async with producer(st.redis, st.inbox) as send:
            await send(w.ops)
            await _stored(st, backlog)
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, st, update)
                await st.start("flusher")
                await _finished_at_least(st, min(limit, backlog // 2))
                left = int(await st.conn.fetchval(BACKLOG_LEFT, PROBE_TYPE))
                for op in probes(probes_n, band):
                    await send([op])
                    await anyio.sleep(every_s)
                await finished(st, inbox=True)
                tg.cancel_scope.cancel()
        update(backlog)
        await workload.verify(st.conn, w)
        expected = workload.expected_statuses(w)
        expected["SUCCESS"] += probes_n
        rows = await st.conn.fetch('SELECT status, count(*) FROM "BatchOperations" GROUP BY 1')
        assert {r[0]: r[1] for r in rows} == expected
        assert await orders_between(st.conn, PROBE_BASE, PROBE_BASE + probes_n) == probes_n
        figures = await probe_figures(st.conn, backlog)
        drained = await st.conn.fetchval(DRAINED, PROBE_TYPE)
    return ProbeRun(band, figures, left, backlog / drained)


async def _stored(st: Stage, n: int) -> None:
    """Return once ``n`` operations are stored and the inbox is empty."""
    while True:
        if not await st.redis.xlen(st.inbox) and await st.conn.fetchval(STORED) >= n:
            return
        await anyio.sleep(0.02)


async def _finished_at_least(st: Stage, n: int) -> None:
    while True:
        if await st.conn.fetchval(FINISHED) >= n:
            return
        await anyio.sleep(0.005)


@dataclass(frozen=True)
class DelayedRun:
    lateness: Lateness
    operations: int
    processes: int


async def delayed_run(
    n: int,
    *,
    low_ms: int,
    high_ms: int,
    processes: int,
    flushers: int,
    limit: int,
    progress: Progress,
) -> DelayedRun:
    """``n`` delayed inserts through the inbox on ``processes`` processes of every role;
    asserts each applied once and none early."""
    async with stage(workload.Workload(), flushers, limit, ["all"] * processes) as st:
        update = progress(f"delayed: {n:,} in {low_ms:,}-{high_ms:,} ms", n)
        async with producer(st.redis, st.inbox) as send, anyio.create_task_group() as tg:
            tg.start_soon(watch, st, update)
            await send(delayed(n, low_ms=low_ms, high_ms=high_ms))
            await finished(st, inbox=True)
            tg.cancel_scope.cancel()
        update(n)
        late = await lateness(st.conn)
        rows = await st.conn.fetch('SELECT status, count(*) FROM "BatchOperations" GROUP BY 1')
        assert {r[0]: r[1] for r in rows} == {"SUCCESS": n}, rows
        assert await orders_between(st.conn, DELAYED_BASE, DELAYED_BASE + n) == n
        assert late.early == 0, f"{late.early} applied before their runAt"
    return DelayedRun(late, n, processes)
