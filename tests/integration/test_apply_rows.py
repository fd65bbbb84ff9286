"""Refused rows of a multi-row statement, found inside PostgreSQL (sql/apply_rows.sql), and
the batch's bookkeeping that goes with its statements (sql/batch.sql).

Whatever the mix of bad rows, the result must be what applying the rows one by one, in
order, would give: the good ones applied, each bad one refused with its own message.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence, Set

import asyncpg
import msgspec
import pytest

from streamsvc.adapters import caller_role, postgres
from streamsvc.allowlist import AllowList
from streamsvc.sqlbuild import COUNT_ROWS
from streamsvc.store.queries import QUERIES
from tests.conftest import PG

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SCHEMA = """
CREATE TABLE parents (id integer PRIMARY KEY);
INSERT INTO parents SELECT generate_series(1, 10);
CREATE TABLE items (
    id integer PRIMARY KEY,
    amount numeric(12, 2) NOT NULL CHECK (amount >= 0),
    parent integer REFERENCES parents (id)
);
"""
# As the flusher renders a multi-row insert (streamsvc.sqlbuild).
INSERT = (
    "INSERT INTO items (id, amount, parent) SELECT r.c0, r.c1, r.c2 "
    "FROM json_to_recordset($1::text::json) AS r(c0 integer, c1 numeric(12,2), c2 integer) "
    f"WHERE {COUNT_ROWS}"
)
CHECK = 'new row for relation "items" violates check constraint "items_amount_check"'


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database=database, **PG)
    await conn.execute(SCHEMA)
    await caller_role.sync(conn, caller_role.DEFAULT, AllowList.parse("items, parents"))
    await postgres.init_connection(conn)
    yield conn
    await conn.close()


def rows(n: int, bad: Set[int] = frozenset(), *, parent: int = 1) -> list[dict[str, object]]:
    """Rows 1..n; those in ``bad`` break the CHECK constraint."""
    return [{"c0": i, "c1": -1 if i in bad else i, "c2": parent} for i in range(1, n + 1)]


def text(records: Sequence[Mapping[str, object] | Sequence[str]]) -> str:
    return msgspec.json.encode(records).decode()


async def apply_groups(
    db: asyncpg.Connection, tables: list[str], statements: list[str], records: list[str]
) -> list[tuple[int, int, str, str]]:
    """The statements applied in one call, neither claiming nor marking: each refused row
    as (statement index, position, SQLSTATE, message)."""
    reply = await db.fetch(
        QUERIES["apply_batch"],
        None,
        None,
        tables,
        statements,
        records,
        [False] * len(statements),
        None,
        [],
        [],
    )
    return [tuple(row)[2:] for row in reply]


async def apply(db: asyncpg.Connection, records: list[dict[str, object]]) -> dict[int, str]:
    """Refused positions with their messages; what was accepted stays applied."""
    async with db.transaction():
        refused = await apply_groups(db, [], [INSERT], [text(records)])
    assert all(index == 1 for index, *_ in refused)
    return {position: message for _, position, _, message in refused}


async def stored(db: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await db.fetch("SELECT id FROM items ORDER BY id")]


@pytest.mark.parametrize(
    "bad",
    [
        set(),
        {1},
        {300},
        {1, 2},
        {150, 151, 152},
        set(random.Random(5).sample(range(1, 301), 12)),
        set(range(1, 301, 2)),
    ],
    ids=["none", "first", "last", "first-two", "run-of-three", "twelve-scattered", "every-other"],
)
async def test_each_refused_row_is_found_and_every_other_applied(
    db: asyncpg.Connection, bad: set[int]
) -> None:
    refused = await apply(db, rows(300, bad))
    assert set(refused) == bad
    assert all(message.startswith(CHECK) for message in refused.values())
    assert await stored(db) == [i for i in range(1, 301) if i not in bad]


async def test_the_row_count_filters_no_row(db: asyncpg.Connection) -> None:
    """Run as it is, outside the isolating function, on a connection whose counter was
    never set, the statement inserts every row."""
    await db.execute(INSERT, msgspec.json.encode(rows(3)).decode())
    assert await stored(db) == [1, 2, 3]


async def test_a_repeated_key_refuses_the_later_row(db: asyncpg.Connection) -> None:
    records = rows(6)
    records[4] = {"c0": 2, "c1": 99, "c2": 1}  # position 5 repeats the key of position 2
    refused = await apply(db, records)
    assert refused == {
        5: 'duplicate key value violates unique constraint "items_pkey"\n'
        "DETAIL:  Key (id)=(2) already exists."
    }
    assert await db.fetchval("SELECT amount FROM items WHERE id = 2") == 2


async def test_checks_at_the_end_of_the_statement_are_isolated_too(
    db: asyncpg.Connection,
) -> None:
    """A foreign key is checked once every row is in: the count of rows reached points at
    the last row, not the bad one, and the search must not trust it."""
    records = rows(50)
    for position in (3, 40):
        records[position - 1]["c2"] = 999  # no such parent
    refused = await apply(db, records)
    assert set(refused) == {3, 40}
    assert all("violates foreign key constraint" in m for m in refused.values())
    assert await stored(db) == [i for i in range(1, 51) if i not in (3, 40)]


async def test_values_that_do_not_convert_are_isolated(db: asyncpg.Connection) -> None:
    records = rows(40, {7})
    records[19]["c1"] = "lots"
    refused = await apply(db, records)
    assert set(refused) == {7, 20}
    assert refused[20] == 'invalid input syntax for type numeric: "lots"'
    assert len(await stored(db)) == 38


async def test_each_refused_row_costs_a_few_probes_not_a_bisection(
    db: asyncpg.Connection,
) -> None:
    """Ten bad rows in 1,000: about two probes each. Halving would take some 130."""
    bad = set(random.Random(9).sample(range(1, 1001), 10))
    await db.execute("SET track_functions = 'pl'")
    async with db.transaction():
        refused = await apply_groups(db, [], [INSERT], [text(rows(1000, bad))])
        probes = await db.fetchval(
            "SELECT calls FROM pg_stat_xact_user_functions WHERE funcname = 'streamsvc_try_rows'"
        )
    assert {r[1] for r in refused} == bad
    assert probes <= 1 + 2 * len(bad)


async def test_several_statements_in_one_call_keep_their_order(db: asyncpg.Connection) -> None:
    """A batch's statements go in one call, in order: the second sees the first's rows;
    each refused row comes back with its statement's index."""
    update = (
        "UPDATE items AS t SET amount = r.c1 FROM json_to_recordset($1::text::json) "
        "AS r(c0 integer, c1 numeric(12,2)) WHERE t.id = r.c0"
    )
    async with db.transaction():
        refused = await apply_groups(
            db,
            ["items", "parents"],
            [INSERT, update],
            [text(rows(5, {2})), text([{"c0": 1, "c1": 50}, {"c0": 3, "c1": -5}])],
        )
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
    assert [(r[0], r[1]) for r in refused] == [(1, 2), (2, 2)]
    assert held == 2, "a lock per table, held by the transaction"
    amounts = dict(await db.fetch("SELECT id, amount FROM items ORDER BY id"))
    assert amounts == {1: 50, 3: 3, 4: 4, 5: 5}


async def pending(db: asyncpg.Connection, n: int) -> list[str]:
    """``n`` new pending operations in BatchOperations; their ids."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    await db.execute(
        """INSERT INTO "BatchOperations" (id, operation_type, body, source, submitted_by)
           SELECT u, 'ITEM', '{}', 'test', 'test' FROM unnest($1::uuid[]) AS u""",
        ids,
    )
    return ids


async def states(db: asyncpg.Connection, ids: list[str]) -> list[tuple[str, str | None, int]]:
    rows = await db.fetch(
        """SELECT id::text, status, error, attempts FROM "BatchOperations"
           WHERE id = ANY($1::uuid[])""",
        ids,
    )
    by_id = {r[0]: (r[1], r[2], r[3]) for r in rows}
    return [by_id[i] for i in ids]


async def test_a_batch_in_one_call_claims_applies_and_marks_the_refused(
    db: asyncpg.Connection,
) -> None:
    """A batch's only call: its rows claimed (SUCCESS, attempt counted), the statement
    applied, the refused row marked FAIL with its message, and so is an operation refused
    earlier in the batch."""
    ids = await pending(db, 4)
    batch = str(uuid.uuid4())
    async with db.transaction():
        reply = await db.fetch(
            QUERIES["apply_batch"],
            ids,
            batch,
            ["items"],
            [INSERT],
            [text(rows(3, {2}))],
            [False],
            [",".join(ids[:3])],
            [ids[3]],
            ["refused before"],
        )
    assert {r[0]: r[1] for r in reply if r[0] is not None} == dict.fromkeys(ids, 1)
    refused = [(r[2], r[3], r[5]) for r in reply if r[0] is None]
    assert [(index, position) for index, position, _ in refused] == [(1, 2)]
    message = refused[0][2]
    assert message.startswith(CHECK)
    assert await states(db, ids) == [
        ("SUCCESS", None, 1),
        ("FAIL", message, 1),
        ("SUCCESS", None, 1),
        ("FAIL", "refused before", 1),
    ]
    assert await stored(db) == [1, 3]
    batch_ids = await db.fetch('SELECT DISTINCT batch_id::text FROM "BatchOperations"')
    assert [r[0] for r in batch_ids] == [batch]


async def test_a_batch_whose_rows_finished_earlier_applies_nothing_in_its_first_call(
    db: asyncpg.Connection,
) -> None:
    """When any of the batch's rows is no longer pending, the first call claims the others
    and stops: no statement applied, no lock taken; the caller plans again."""
    ids = await pending(db, 3)
    await db.execute("""UPDATE "BatchOperations" SET status = 'SUCCESS' WHERE id = $1""", ids[1])
    async with db.transaction():
        reply = await db.fetch(
            QUERIES["apply_batch"],
            ids,
            str(uuid.uuid4()),
            ["items"],
            [INSERT],
            [text(rows(3))],
            [False],
            [",".join(ids)],
            [],
            [],
        )
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
    assert sorted(r[0] for r in reply) == sorted([ids[0], ids[2]])
    assert held == 0
    assert await stored(db) == []


# A caller's statement as the flusher sends it (streamsvc.sqlbuild.caller_template).
EACH = "INSERT INTO items (id, amount, parent) VALUES (%1$L, %2$L, 1)"


@pytest.mark.parametrize(
    "bad",
    [set(), {1}, {60}, {1, 2, 3}, set(random.Random(3).sample(range(1, 61), 9))],
    ids=["none", "first", "last", "first-three", "nine-scattered"],
)
async def test_each_refused_statement_is_found_and_every_other_applied(
    db: asyncpg.Connection, bad: set[int]
) -> None:
    """A statement group, once per operation: the refused ones (a value that does not
    convert, a broken CHECK) come back with their positions, the rest is applied, and a
    refused statement costs about two probes."""
    params = [[str(i), ("lots" if i % 2 else "-1") if i in bad else str(i)] for i in range(1, 61)]
    await db.execute("SET track_functions = 'pl'")
    async with db.transaction():
        refused = await db.fetch(
            QUERIES["apply_batch"], None, None, [], [EACH], [text(params)], [True], None, [], []
        )
        probes = await db.fetchval(
            "SELECT calls FROM pg_stat_xact_user_functions "
            "WHERE funcname = 'streamsvc_as_caller_each'"
        )
    messages = {r[3]: r[5] for r in refused}
    assert set(messages) == bad
    for position, message in messages.items():
        if position % 2:
            assert message == 'invalid input syntax for type numeric: "lots"'
        else:
            assert message.startswith(CHECK)
    assert await stored(db) == [i for i in range(1, 61) if i not in bad]
    assert probes is not None
    assert probes <= 1 + 2 * len(bad)


PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE name = 'streamsvc_caller_statement'"


async def test_a_statement_group_is_prepared_once_and_leaves_nothing_prepared(
    db: asyncpg.Connection,
) -> None:
    """Past its first statement a group runs prepared, with the text the caller sent (a
    `%` in it kept); a text PostgreSQL cannot prepare alone (one parameter, two types)
    runs as literals; afterwards no statement prepared for a caller is left."""
    percent = "INSERT INTO items (id, amount, parent) VALUES (%1$L, %2$L, length('50%%'))"
    two_types = "UPDATE items SET amount = %2$L, parent = %2$L WHERE id = %1$L"
    inserted = [[str(i), str(i)] for i in range(1, 7)]
    updated = [[str(i), str(i + 1)] for i in range(1, 7)]
    async with db.transaction():
        refused = await db.fetch(
            QUERIES["apply_batch"],
            None,
            None,
            [],
            [percent, two_types],
            [text(inserted), text(updated)],
            [True, True],
            None,
            [],
            [],
        )
        left = await db.fetchval(PREPARED)
    assert refused == []
    assert left == 0
    found = await db.fetch("SELECT id, amount, parent FROM items ORDER BY id")
    assert [tuple(r) for r in found] == [(i, i + 1, i + 1) for i in range(1, 7)]


async def test_a_statement_a_timeout_left_prepared_goes_with_the_cleanup(
    db: asyncpg.Connection,
) -> None:
    """A timeout is not caught: the call ends before it can deallocate, and the
    connection's cleanup after the batch does it."""
    sleepy = "INSERT INTO items (id, amount, parent) SELECT %1$L, 1, 1 FROM pg_sleep(%2$L)"
    params = [[str(i), "5" if i == 5 else "0"] for i in range(1, 7)]
    with pytest.raises(asyncpg.QueryCanceledError):
        async with db.transaction():
            await db.execute("SET LOCAL statement_timeout = '300ms'")
            await db.fetch(
                QUERIES["apply_batch"],
                None,
                None,
                [],
                [sleepy],
                [text(params)],
                [True],
                None,
                [],
                [],
            )
    assert await db.fetchval(PREPARED) == 1
    await db.execute(QUERIES["clean_session"])
    assert await db.fetchval(PREPARED) == 0
    assert await stored(db) == []


async def test_a_timeout_while_waiting_for_the_table_locks_is_a_lock_wait(
    db: asyncpg.Connection, database: str
) -> None:
    """The statement timeout's clock runs while the first call waits for the table locks;
    should it end the call there (no lock_timeout here, or a cancel), the call ends as a
    lock wait (55P03), which the flusher retries and never cuts."""
    holder = await asyncpg.connect(database=database, **PG)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('streamsvc:public.items', 0))"
            )
            with pytest.raises(asyncpg.LockNotAvailableError) as raised:
                async with db.transaction():
                    await db.execute("SET LOCAL statement_timeout = '200ms'")
                    await db.execute("SET LOCAL lock_timeout = 0")
                    await db.fetch(
                        QUERIES["apply_batch"],
                        None,
                        None,
                        ["public.items"],
                        [INSERT],
                        [text(rows(3))],
                        [False],
                        None,
                        [],
                        [],
                    )
    finally:
        await holder.close()
    assert "waiting for the table lock of public.items" in str(raised.value)
    assert isinstance(postgres.translate(raised.value), postgres.LockWait)
    assert await stored(db) == []


@pytest.mark.parametrize("each", [False, True], ids=["rows", "statement-group"])
async def test_a_row_lock_that_runs_out_ends_the_call_and_refuses_nothing(
    db: asyncpg.Connection, database: str, each: bool
) -> None:
    """A row held by another transaction past lock_timeout is not a refused row: the call
    ends with 55P03 at once, without searching the statement (which would wait again for
    every probe)."""
    await db.execute("INSERT INTO items VALUES (2, 1, 1)")
    if each:
        statement = "UPDATE items SET amount = amount + 1 WHERE id = %1$L"
        params = text([[str(i)] for i in range(1, 5)])
    else:
        statement = (
            "UPDATE items SET amount = r.c1 FROM json_to_recordset($1::text::json) "
            "AS r(c0 integer, c1 numeric(12,2)) WHERE items.id = r.c0"
        )
        params = text([{"c0": i, "c1": 5} for i in range(1, 5)])
    holder = await asyncpg.connect(database=database, **PG)
    try:
        async with holder.transaction():
            await holder.execute("SELECT FROM items WHERE id = 2 FOR UPDATE")
            with pytest.raises(asyncpg.LockNotAvailableError):
                async with db.transaction():
                    await db.execute("SET LOCAL lock_timeout = '100ms'")
                    await db.fetch(
                        QUERIES["apply_batch"],
                        None,
                        None,
                        [],
                        [statement],
                        [params],
                        [each],
                        None,
                        [],
                        [],
                    )
    finally:
        await holder.close()
    await db.execute(QUERIES["clean_session"])
