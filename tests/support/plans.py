"""A BatchOperations table filled like a busy service's, the shapes of list and count it is
asked for, and what PostgreSQL plans for each: for tests/integration/test_list_plans.py,
which checks each shape reads its own index, and benchmarks/plans.py, which prints the
plans for docs/queries.md."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import asyncpg

from streamsvc.model import ListQuery, Status
from streamsvc.store import listing
from streamsvc.store.queries import QUERIES

CALLERS = 50
TYPES = 20
RARE_CALLER = f"caller-{CALLERS - 1:02}"  # about 0.3% of the rows (see FILL)
RARE_TYPE = f"TYPE_{TYPES - 1:02}"  # about 1.3%

# $1 rows over the last $2 days: 94% SUCCESS, 3% FAIL, 1% each CANCELLED, PROCESSING and
# UNPROCESSED; operationTypes and callers skewed (the square of a uniform draw), so a few
# are common and the last ones rare.
FILL = f"""
INSERT INTO "BatchOperations" (id, operation_type, body, status, error, attempts, source,
                               submitted_by, created_at, updated_at, processed_at)
SELECT gen_random_uuid(), g.t,
       jsonb_build_object('operationType', g.t, 'table', 'orders', 'action', 'insert',
                          'values', jsonb_build_object('id', g.i, 'customer', 'c', 'amount', 1)),
       s.status, CASE WHEN s.status = 'FAIL' THEN 'new row violates check constraint' END,
       CASE WHEN s.status IN ('SUCCESS', 'FAIL') THEN 1 ELSE 0 END, 'rpc', g.c, g.at, g.at,
       CASE WHEN s.status IN ('SUCCESS', 'FAIL', 'CANCELLED') THEN g.at + interval '50 ms' END
FROM (SELECT i, 'TYPE_' || lpad(floor(power(random(), 2) * {TYPES})::int::text, 2, '0') AS t,
             'caller-' || lpad(floor(power(random(), 2) * {CALLERS})::int::text, 2, '0') AS c,
             now() - make_interval(days => $2) * random() AS at, random() AS r
      FROM generate_series(1, $1::int) AS i) AS g
CROSS JOIN LATERAL (
    SELECT CASE WHEN g.r < 0.94 THEN 'SUCCESS' WHEN g.r < 0.97 THEN 'FAIL'
                WHEN g.r < 0.98 THEN 'CANCELLED' WHEN g.r < 0.99 THEN 'PROCESSING'
                ELSE 'UNPROCESSED' END AS status) AS s
"""


async def fill(conn: asyncpg.Connection, rows: int, *, days: int = 30) -> None:
    """``rows`` operations created over the last ``days``, then VACUUM ANALYZE (statistics,
    and the visibility map index-only scans rely on)."""
    await conn.execute(FILL, rows, days)
    await conn.execute('VACUUM ANALYZE "BatchOperations"')


class Shape(NamedTuple):
    """A list as a caller asks for it, and the index that should serve it."""

    name: str
    query: ListQuery
    owner: str | None
    uses: str  # the index


SHAPES = [
    Shape("everyone's", ListQuery(), None, "BatchOperations_list_idx"),
    Shape("everyone's FAIL", ListQuery(status=Status.FAIL), None, "BatchOperations_list_idx"),
    Shape(
        "everyone's of a rare type",
        ListQuery(operation_type=RARE_TYPE),
        None,
        "BatchOperations_type_list_idx",
    ),
    Shape(
        "everyone's FAIL of a rare type",
        ListQuery(status=Status.FAIL, operation_type=RARE_TYPE),
        None,
        "BatchOperations_type_list_idx",
    ),
    Shape("a rare caller's own", ListQuery(), RARE_CALLER, "BatchOperations_caller_list_idx"),
    Shape(
        "a rare caller's own FAIL",
        ListQuery(status=Status.FAIL),
        RARE_CALLER,
        "BatchOperations_caller_list_idx",
    ),
    Shape(
        "a rare caller's own of a rare type",
        ListQuery(operation_type=RARE_TYPE),
        RARE_CALLER,
        "BatchOperations_caller_type_list_idx",
    ),
    Shape(
        "a rare caller's own FAIL of a rare type",
        ListQuery(status=Status.FAIL, operation_type=RARE_TYPE),
        RARE_CALLER,
        "BatchOperations_caller_type_list_idx",
    ),
]

# (query name, takes an owner, index): the counts, and finished operations per minute.
COUNTS = [
    ("count_statuses", False, "BatchOperations_list_idx"),
    ("count_types", False, "BatchOperations_list_idx"),
    ("count_statuses_of", True, "BatchOperations_caller_list_idx"),
    ("count_types_of", True, "BatchOperations_caller_list_idx"),
]
THROUGHPUT_INDEX = "BatchOperations_finished_idx"


def list_statement(
    shape: Shape, after: tuple[dt.datetime, str] | None = None
) -> tuple[str, list[Any]]:
    """The statement and arguments PgStore.list_operations runs for ``shape``."""
    given = listing.filters(shape.query, shape.owner)
    sql = listing.page_statement(tuple(column for column, _ in given))
    page = listing.bounds(shape.query, after)
    return sql, listing.arguments(shape.query, page, given)


def count_statement(
    name: str, owner: str | None, since: dt.datetime, until: dt.datetime
) -> tuple[str, list[Any]]:
    return QUERIES[name], [since, until, *([owner] if owner is not None else [])]


async def deep_position(conn: asyncpg.Connection, shape: Shape) -> tuple[dt.datetime, str] | None:
    """A cursor position near the end of ``shape``'s list: about 90% of it lies above
    (None: the list is empty)."""
    given = listing.filters(shape.query, shape.owner)
    where = " AND ".join(f"{c} = ${n}" for n, (c, _) in enumerate(given, start=1)) or "true"
    row = await conn.fetchrow(
        f'SELECT created_at, id::text AS id FROM "BatchOperations" WHERE {where} '
        'ORDER BY created_at, id OFFSET (SELECT count(*) / 10 FROM "BatchOperations" '
        f"WHERE {where}) LIMIT 1",
        *(value for _, value in given),
    )
    return None if row is None else (row["created_at"], row["id"])


async def plan(
    conn: asyncpg.Connection, sql: str, args: list[Any], *, generic: bool = False
) -> dict[str, Any]:
    """EXPLAIN (FORMAT JSON)'s top node, as the first executions (custom plans, the
    arguments known) or, ``generic``, as a prepared statement's generic plan."""
    if not generic:
        found = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        return dict(json.loads(found)[0]["Plan"])
    types = [_pg_type(arg) for arg in args]
    # EXPLAIN EXECUTE takes no bound parameters: the arguments go in as quoted literals.
    values = [
        f"{await conn.fetchval('SELECT quote_literal($1::text)', str(arg))}::{kind}"
        for arg, kind in zip(args, types, strict=True)
    ]
    async with conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE shape ({', '.join(types)}) AS {sql}")
        try:
            found = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE shape ({', '.join(values)})"
            )
        finally:
            await conn.execute("DEALLOCATE shape")
    return dict(json.loads(found)[0]["Plan"])


def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def problems(top: dict[str, Any], index: str, *, sorts: int = 0) -> list[str]:
    """What in a plan reads more than its index's ranges: a scan of anything but
    ``index``, a Seq Scan, a Sort of more than ``sorts`` rows (as estimated: a filter
    that matches fewer rows than a page may be read all and sorted), and then a bitmap
    scan (read in no order, so sorted)."""
    found = []
    for node in nodes(top):
        kind = node["Node Type"]
        if kind in ("Sort", "Incremental Sort") and node["Plans"][0]["Plan Rows"] > sorts:
            found.append(f"{kind} of {node['Plans'][0]['Plan Rows']} rows")
        elif kind == "Seq Scan" or (kind == "Bitmap Heap Scan" and node["Plan Rows"] > sorts):
            found.append(kind)
        elif "Index Name" in node and node["Index Name"] != index:
            found.append(f"{kind} on {node['Index Name']}")
    if not any(n.get("Index Name") == index for n in nodes(top)):
        found.append(f"{index} not used")
    return found


def _pg_type(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return "timestamptz"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, str):
        return "text"
    return "uuid"
