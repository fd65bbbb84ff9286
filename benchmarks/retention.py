"""Retention under load (`just bench --only retention`): the inbox's throughput while
retention deletes a million old finished operations, beside the same run without
retention, in one run (docs/retention.md, docs/benchmarks.md).

Each run gets a fresh stage whose database first holds ``old`` finished operations
(SUCCESS, finished ``OLD_DAYS`` ago; `seed_old`, one INSERT ... SELECT
generate_series), then the mixed workload goes in through the inbox as in the inbox
scenario. With retention (STREAMSVC_RETENTION_DAYS=7) the sweeper process deletes the old
rows meanwhile; without (0) they stay. Reported: each run's ops/s, their ratio, and the old
rows deleted per second while the workload ran and after it, alone, until none was left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import asyncpg

from benchmarks import scenarios, workload
from benchmarks.stage import finished, stage

Progress = Callable[[str, int], Callable[[int], None]]

OLD_DAYS = 30.0  # how long ago the seeded operations finished: far past the default 7 days
OLD_TYPE = "OLD_FINISHED"

# ``$1`` operations of type ``$4`` with status ``$2``, stored ``$3`` days ago (spread over the
# ``$1`` milliseconds before that) and, when final, finished then; bodies as the service
# stores them.
SEED = """
INSERT INTO "BatchOperations" (
    id, operation_type, body, status, attempts, source, submitted_by, batch_id,
    created_at, updated_at, processed_at)
SELECT gen_random_uuid(), $4::text,
       jsonb_build_object('operationType', $4::text, 'table', 'orders', 'action', 'insert',
                          'values', jsonb_build_object('id', g, 'customer', 'old',
                                                       'amount', 1)),
       $2::text, 1, 'bench', 'anonymous', gen_random_uuid(), t, t,
       CASE WHEN $2::text IN ('SUCCESS', 'FAIL', 'CANCELLED') THEN t END
FROM generate_series(1, $1::int) AS g,
     LATERAL (SELECT now() - make_interval(secs => $3::float8 * 86400 + g / 1000.0)) AS old(t)
"""
# Whether any operation is past the retention window: one probe of its index.
ANY_OLD = """SELECT EXISTS (SELECT 1 FROM "BatchOperations"
                            WHERE status IN ('SUCCESS', 'FAIL', 'CANCELLED')
                              AND processed_at < now() - interval '7 days')"""
OLD_LEFT = 'SELECT count(*) FROM "BatchOperations" WHERE operation_type = $1'


async def seed_old(
    conn: asyncpg.Connection,
    n: int,
    *,
    days: float = OLD_DAYS,
    status: str = "SUCCESS",
    operation_type: str = OLD_TYPE,
) -> None:
    """``n`` operations stored ``days`` ago with ``status`` (finished then, when final), as
    retention finds them."""
    await conn.execute(SEED, n, status, days, operation_type)
    await conn.execute('ANALYZE "BatchOperations"')


async def old_left(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(OLD_LEFT, OLD_TYPE))


# The workload's statuses, the seeded operations left out.
WORKLOAD_STATUSES = """SELECT status, count(*) FROM "BatchOperations"
                       WHERE operation_type <> $1 GROUP BY status"""
DAYS_ON, DAYS_OFF = "7", "0"  # STREAMSVC_RETENTION_DAYS of the two runs


@dataclass(frozen=True)
class RetentionRun:
    retention: bool
    operations: int
    seconds: float  # first submission until no operation of the workload is pending
    old: int  # old operations seeded
    deleted_during: int  # old operations deleted while the workload ran
    left_at_end: int  # old operations still there when it was done
    after_s: float | None  # then, until none was left (retention on)


async def run(
    n: int,
    *,
    old: int,
    retention: bool,
    flushers: int,
    limit: int,
    roles: list[str],
    progress: Progress,
) -> RetentionRun:
    """``n`` operations of the mixed workload through the inbox, closed loop, on a stage
    whose database holds ``old`` old finished operations, with retention on or off; every
    effect and status checked. With retention on, the run fails unless old rows were still
    being deleted when the workload was done (else it did not measure what it claims)."""
    w = workload.build(n)
    env = {"STREAMSVC_RETENTION_DAYS": DAYS_ON if retention else DAYS_OFF}

    async def prepare(conn: asyncpg.Connection) -> None:
        await seed_old(conn, old)

    label = f"retention {'on' if retention else 'off'}"
    update = progress(f"{label}: {n:,} operations beside {old:,} old", n)
    async with stage(w, flushers, limit, roles, env=env, prepare=prepare) as st:
        async with scenarios.connect("inbox", **st.ingress()) as ingress:
            left_before = await old_left(st.conn)
            started = time.perf_counter()
            # No `watch`: counting finished rows among a million old ones would load the
            # server it measures; `finished` asks the pending rows' index only.
            await scenarios.drive(ingress, w.ops)
            await finished(st, inbox=True)
            elapsed = time.perf_counter() - started
            left_at_end = await old_left(st.conn)
        update(n)
        after_s = None
        if retention:
            assert left_at_end > 0, "retention finished before the workload: raise --n-old"
            ended = time.perf_counter()
            while True:
                if not await st.conn.fetchval(ANY_OLD):
                    break
                await anyio.sleep(0.1)
            after_s = time.perf_counter() - ended
        await workload.verify(st.conn, w)
        rows = await st.conn.fetch(WORKLOAD_STATUSES, OLD_TYPE)
        assert {r[0]: r[1] for r in rows} == workload.expected_statuses(w)
    return RetentionRun(retention, n, elapsed, old, left_before - left_at_end, left_at_end, after_s)
