from typing import Any

import msgspec
import pytest

from streamsvc.model import Operation, WorkOp
from streamsvc.sqlbuild import caller_template, param_text, plan, render
from tests.unit.fixtures import catalog

CATALOG = catalog()


def item(i: int, **fields: Any) -> WorkOp:
    return WorkOp(f"id{i}", msgspec.convert({"operationType": "T", **fields}, Operation))


def ins(i: int, table: str = "orders", **values: Any) -> WorkOp:
    return item(i, table=table, action="insert", values={"id": i, **values})


def upd(i: int, target: int, note: str) -> WorkOp:
    return item(i, table="orders", action="update", values={"note": note}, key={"id": target})


def ids(groups: list[Any]) -> list[list[str]]:
    return [[m.id for m in g.members] for g in groups]


def test_same_shape_merges_into_one_statement() -> None:
    groups = plan([ins(1, customer="a"), ins(2, customer="b"), ins(3, "payments")], CATALOG)
    assert ids(groups) == [["id1", "id2"], ["id3"]]


def test_different_columns_make_different_statements() -> None:
    groups = plan([ins(1, customer="a"), ins(2, note="b"), ins(3, customer="c")], CATALOG)
    assert ids(groups) == [["id1", "id3"], ["id2"]]


def test_identical_sql_texts_merge() -> None:
    sql = {"sql": "UPDATE counters SET value = value + 1 WHERE name = $1"}
    groups = plan([item(1, **sql, params=["a"]), item(2, **sql, params=["b"])], CATALOG)
    assert ids(groups) == [["id1", "id2"]]
    statement = render(groups[0], CATALOG)
    assert statement.each
    assert statement.sql == "UPDATE counters SET value = value + 1 WHERE name = %1$L"
    assert msgspec.json.decode(statement.rows) == [["a"], ["b"]]


@pytest.mark.parametrize(
    ("sql", "template"),
    [
        ("DELETE FROM t WHERE a = $1 AND b = $12", "DELETE FROM t WHERE a = %1$L AND b = %12$L"),
        # a % of the caller's is kept as it is; $n inside strings and comments are not params
        (
            "UPDATE t SET s = '50% $1' || $2 WHERE x LIKE 'a%' -- $3",
            "UPDATE t SET s = '50%% $1' || %2$L WHERE x LIKE 'a%%' -- $3",
        ),
        ("UPDATE t SET s = $$ $1 $$, u = $1", "UPDATE t SET s = $$ $1 $$, u = %1$L"),
        ("UPDATE t SET s = 'ü€𝄞', u = $1", "UPDATE t SET s = 'ü€𝄞', u = %1$L"),
        # a trailing ; (and comments after it) goes: the statement runs inside a WITH
        ("INSERT INTO t VALUES (1); -- done\n", "INSERT INTO t VALUES (1)"),
        ("INSERT INTO t VALUES (1);;", "INSERT INTO t VALUES (1)"),
        # a second statement stays, for PostgreSQL to refuse
        ("INSERT INTO t VALUES (1); DROP TABLE t", "INSERT INTO t VALUES (1); DROP TABLE t"),
    ],
)
def test_caller_template(sql: str, template: str) -> None:
    assert caller_template(sql) == template


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, None),
        ("x", "x"),
        (True, "true"),
        (False, "false"),
        (12, "12"),
        (1.5, "1.5"),
        ({"a": [1, None]}, '{"a":[1,null]}'),
        ([1, 2], "[1,2]"),
    ],
)
def test_param_text_is_postgresql_text_input(value: Any, text: str | None) -> None:
    assert param_text(value) == text


def test_a_row_touched_twice_keeps_submission_order() -> None:
    # update row 5 twice: the second update must run after the first, in its own statement
    groups = plan([upd(1, 5, "first"), upd(2, 6, "x"), upd(3, 5, "second")], CATALOG)
    assert ids(groups) == [["id1", "id2"], ["id3"]]


def test_an_operation_never_jumps_ahead_of_an_earlier_one_on_its_row() -> None:
    delete = item(2, table="orders", action="delete", key={"id": 7})
    # insert 7, delete 7, insert 7 again: the re-insert cannot join the first insert group
    groups = plan(
        [ins(7, customer="a"), delete, ins(7, customer="b"), ins(8, customer="c")], CATALOG
    )
    assert ids(groups) == [["id7"], ["id2"], ["id7", "id8"]]


def test_insert_statement_takes_one_json_parameter() -> None:
    statement = render(
        plan([ins(1, customer="a", amount=2), ins(2, customer="b", amount=3)], CATALOG)[0], CATALOG
    )
    assert statement.sql == (
        'INSERT INTO "public"."orders" ("amount", "customer", "id") SELECT r.c0, r.c1, r.c2 '
        "FROM json_to_recordset($1::text::json) AS r(c0 numeric(12,2), c1 text, c2 integer) "
        "WHERE nextval('pg_temp.streamsvc_rows_reached') IS NOT NULL"
    )
    assert not statement.each
    assert msgspec.json.decode(statement.rows) == [
        {"c0": 2, "c1": "a", "c2": 1},
        {"c0": 3, "c1": "b", "c2": 2},
    ]


def test_upsert_update_delete_statements() -> None:
    upsert = item(1, table="counters", action="upsert", values={"value": 1}, key={"name": "a"})
    assert render(plan([upsert], CATALOG)[0], CATALOG).sql.endswith(
        'ON CONFLICT ("name") DO UPDATE SET "value" = EXCLUDED."value"'
    )
    update = render(plan([upd(1, 5, "n")], CATALOG)[0], CATALOG).sql
    assert update.startswith('UPDATE "public"."orders" AS t SET "note" = r.c0 FROM')
    assert update.endswith('WHERE t."id" = r.c1')
    delete = item(1, table="orders", action="delete", key={"id": 3})
    assert render(plan([delete], CATALOG)[0], CATALOG).sql.endswith('WHERE t."id" = r.c0')


def test_split_keeps_order() -> None:
    group = plan([ins(i, customer="a") for i in range(5)], CATALOG)[0]
    first, second = group.split()
    assert ids([first, second]) == [["id0", "id1"], ["id2", "id3", "id4"]]
