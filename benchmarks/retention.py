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

import asyncpg

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
