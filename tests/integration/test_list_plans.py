"""Each shape of list, and each count, reads its own index (sql/007_list_indexes.sql): no
Seq Scan, no Sort, no other index, at the first page and at a deep cursor, as the first
executions plan it (custom plans) and as a prepared statement's generic plan does. On a
table of 100,000 rows analyzed, large enough that PostgreSQL would scan or sort it
if no index fitted. docs/queries.md shows the same plans on 2 million rows."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from streamsvc.store.queries import QUERIES
from tests.support import plans

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROWS = 100_000


@pytest.fixture
async def filled(conn: asyncpg.Connection) -> asyncpg.Connection:
    await plans.fill(conn, ROWS)
    return conn


async def test_every_list_shape_reads_its_index_at_the_first_page_and_deep(
    filled: asyncpg.Connection,
) -> None:
    found: dict[tuple[object, ...], list[str]] = {}
    for shape in plans.SHAPES:
        deep = await plans.deep_position(filled, shape)
        for where, after in (("first page", None), ("deep", deep)):
            sql, args = plans.list_statement(shape, after)
            for generic in (False, True):
                top = await plans.plan(filled, sql, args, generic=generic)
                # A shape whose filter matches fewer rows than a page may read them all.
                sorts = 2 * (shape.query.limit + 1)
                found[(shape.name, where, generic)] = plans.problems(top, shape.uses, sorts=sorts)
    failed = {k: v for k, v in found.items() if v}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())


async def test_every_count_and_the_throughput_read_only_their_index(
    filled: asyncpg.Connection,
) -> None:
    now = dt.datetime.now(dt.UTC)
    found: dict[tuple[object, ...], list[str]] = {}
    for name, mine, index in plans.COUNTS:
        for window in (dt.timedelta(hours=1), dt.timedelta(days=1)):
            owner = plans.RARE_CALLER if mine else None
            sql, args = plans.count_statement(name, owner, now - window, now)
            for generic in (False, True):
                top = await plans.plan(filled, sql, args, generic=generic)
                # Grouping may sort the window's entries; never more than those.
                found[(name, window, generic)] = plans.problems(top, index, sorts=ROWS // 20)
                kinds = {n["Node Type"] for n in plans.nodes(top) if "Index Name" in n}
                assert kinds == {"Index Only Scan"}, (name, kinds)
    top = await plans.plan(filled, QUERIES["throughput"], [60])
    # The minutes (generate_series, estimated at 1,000 rows) may be sorted for a join.
    found[("throughput", None, False)] = plans.problems(top, plans.THROUGHPUT_INDEX, sorts=1000)
    failed = {k: v for k, v in found.items() if v}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
