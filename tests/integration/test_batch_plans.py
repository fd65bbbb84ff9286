"""How PostgreSQL plans a batch's statements (streamsvc.sqlbuild): an UPDATE or DELETE of a
few rows finds them by their key's index, not by scanning the table, so a small batch costs
what its rows cost. Without the rows' count, PostgreSQL takes json_to_recordset for 100
rows and, on a table of a few thousand, prefers a hash join over all of it."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest

from benchmarks.harness import PG
from streamsvc.allowlist import AllowList
from streamsvc.catalog import Catalog
from streamsvc.model import Operation, WorkOp
from streamsvc.sqlbuild import plan, render
from tests.conftest import ALLOWED

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROWS = 5_000  # with json_to_recordset estimated at 100 rows, a hash join wins here


def op(n: int, **fields: object) -> WorkOp:
    return WorkOp(f"id{n}", msgspec.convert({"operationType": "T", **fields}, Operation))


@pytest.mark.parametrize(
    "action",
    [
        {"action": "update", "values": {"customer": "x"}},
        {"action": "delete"},
    ],
    ids=["update", "delete"],
)
async def test_a_few_rows_are_found_by_index_in_a_large_table(
    database: str, action: dict[str, object]
) -> None:
    conn = await asyncpg.connect(database=database, **PG)
    try:
        await conn.execute(
            "INSERT INTO orders (id, customer, amount) SELECT g, 'c', 1 "
            "FROM generate_series(1, $1::int) g",
            ROWS,
        )
        await conn.execute("ANALYZE orders")
        catalog = Catalog(AllowList.parse(ALLOWED))
        await catalog.load(conn)
        items = [op(n, table="orders", key={"id": n * 7}, **action) for n in (1, 2)]
        (group,) = plan(items, catalog)
        statement = render(group, catalog)
        explained = await conn.fetch(f"EXPLAIN {statement.sql}", statement.rows)
        shape = "\n".join(row[0] for row in explained)
        assert "Index Scan using orders_pkey" in shape, shape
        assert "Seq Scan on orders" not in shape, shape
    finally:
        await conn.close()
