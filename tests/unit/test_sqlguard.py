"""sqlguard: which caller SQL may run, and the reasons given when it may not."""

from __future__ import annotations

from typing import Any

import pytest

from streamsvc.allowlist import AllowList, TableRef
from streamsvc.errors import InvalidOperation
from streamsvc.sqlguard import CheckedStatement, check_statement

ALLOWED = AllowList.parse("orders, customers, shop.items, payments(id, amount)")
ORDERS = TableRef("public", "orders")


@pytest.mark.parametrize(
    ("sql", "params", "expected"),
    [
        pytest.param(
            "INSERT INTO orders (id, total) VALUES ($1, $2)",
            [1, 9.5],
            CheckedStatement(ORDERS, "insert", 2),
            id="insert-with-params",
        ),
        pytest.param(
            "UPDATE orders o SET total = c.credit FROM customers c WHERE c.id = o.customer_id",
            None,
            CheckedStatement(ORDERS, "update", 0),
            id="update-from-allowed-table",
        ),
        pytest.param(
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id AND c.name = $1",
            ["bob"],
            CheckedStatement(ORDERS, "delete", 1),
            id="delete-using",
        ),
        pytest.param(
            "INSERT INTO orders (id, note) VALUES (1, 'it''s $1, not a param')",
            None,
            CheckedStatement(ORDERS, "insert", 0),
            id="legacy-insert-with-literals",
        ),
        pytest.param(
            "UPDATE shop.items SET price = $1 WHERE id = $2",
            [3, 4],
            CheckedStatement(TableRef("shop", "items"), "update", 2),
            id="schema-qualified",
        ),
        pytest.param(
            "INSERT INTO public.orders (id) VALUES ($1)",
            [1],
            CheckedStatement(ORDERS, "insert", 1),
            id="public-qualified",
        ),
        pytest.param(
            "WITH recent AS (SELECT id FROM customers WHERE id > $1) "
            "INSERT INTO orders (customer_id) SELECT id FROM recent",
            [10],
            CheckedStatement(ORDERS, "insert", 1),
            id="cte-name-reference",
        ),
        pytest.param(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) "
            "INSERT INTO orders (id) SELECT i FROM n",
            None,
            CheckedStatement(ORDERS, "insert", 0),
            id="recursive-cte",
        ),
        pytest.param(
            "INSERT INTO payments (id, amount) VALUES ($1, $2) "
            "ON CONFLICT (id) DO UPDATE SET amount = excluded.amount",
            [1, 2],
            CheckedStatement(TableRef("public", "payments"), "insert", 2),
            id="on-conflict-do-update-restricted",
        ),
        pytest.param(
            "UPDATE payments SET amount = amount + 1 WHERE id = $1 RETURNING id",
            [1],
            CheckedStatement(TableRef("public", "payments"), "update", 1),
            id="update-allowed-columns",
        ),
        pytest.param(
            "INSERT INTO orders (id, total) VALUES ($1, now()), ($2, lower('X')::int)",
            [1, 2],
            CheckedStatement(ORDERS, "insert", 2),
            id="harmless-functions",
        ),
        pytest.param(
            "INSERT INTO orders (id) VALUES ($1);",
            [1],
            CheckedStatement(ORDERS, "insert", 1),
            id="trailing-semicolon",
        ),
    ],
)
def test_accepted(sql: str, params: list[Any] | None, expected: CheckedStatement) -> None:
    assert check_statement(sql, params, ALLOWED) == expected


@pytest.mark.parametrize(
    ("sql", "params", "field", "words"),
    [
        # empty or unparsable
        pytest.param("", None, "sql", ["empty"], id="empty"),
        pytest.param("  \n\t ", [], "sql", ["empty"], id="whitespace"),
        pytest.param("INSERT INTO", None, "sql", ["does not parse", "syntax error"], id="parse"),
        pytest.param("INSERT INTO orders VALUES (1)\x00", None, "sql", ["NUL"], id="nul"),
        # statement count
        pytest.param("-- just a comment", None, "sql", ["exactly one", "got 0"], id="none"),
        pytest.param(
            "INSERT INTO orders (id) VALUES (1); COMMIT",
            None,
            "sql",
            ["exactly one", "got 2"],
            id="insert-then-commit",
        ),
        pytest.param(
            "INSERT INTO orders (id) VALUES (1); INSERT INTO orders (id) VALUES (2)",
            None,
            "sql",
            ["exactly one", "got 2"],
            id="two-inserts",
        ),
        # statement kind
        pytest.param("COMMIT", None, "sql", ["got COMMIT"], id="commit"),
        pytest.param("ROLLBACK", None, "sql", ["got ROLLBACK"], id="rollback"),
        pytest.param("BEGIN", None, "sql", ["got BEGIN"], id="begin"),
        pytest.param("SAVEPOINT s", None, "sql", ["got SAVEPOINT"], id="savepoint"),
        pytest.param("CREATE TABLE x (a int)", None, "sql", ["got CREATE TABLE"], id="create"),
        pytest.param("DROP TABLE orders", None, "sql", ["got DROP TABLE"], id="drop"),
        pytest.param("ALTER TABLE orders ADD b int", None, "sql", ["got ALTER TABLE"], id="alter"),
        pytest.param("TRUNCATE orders", None, "sql", ["got TRUNCATE"], id="truncate"),
        pytest.param("GRANT ALL ON orders TO bob", None, "sql", ["got GRANT"], id="grant"),
        pytest.param(
            "SELECT * INTO x FROM orders", None, "sql", ["got SELECT INTO"], id="select-into"
        ),
        pytest.param("SELECT 1", None, "sql", ["only INSERT", "got SELECT"], id="select"),
        pytest.param("COPY orders FROM '/etc/passwd'", None, "sql", ["got COPY"], id="copy"),
        pytest.param("DO $$ BEGIN END $$", None, "sql", ["got DO"], id="do"),
        pytest.param("CALL p()", None, "sql", ["got CALL"], id="call"),
        pytest.param("SET search_path = x", None, "sql", ["got SET"], id="set"),
        pytest.param(
            "MERGE INTO orders USING customers ON true WHEN MATCHED THEN DELETE",
            None,
            "sql",
            ["got MERGE"],
            id="merge",
        ),
        # tables
        pytest.param("INSERT INTO secret (a) VALUES (1)", None, "sql", ['"secret"'], id="table"),
        pytest.param(
            'INSERT INTO "or""ders" (id) VALUES (1)',
            None,
            "sql",
            ['table "or""ders" is not allowed'],
            id="quoted-name",
        ),
        pytest.param(
            'INSERT INTO "public.orders" (id) VALUES (1)',
            None,
            "sql",
            ['table "public.orders" is not allowed'],
            id="dot-inside-quoted-name",
        ),
        pytest.param(
            "INSERT INTO other.orders (id) VALUES (1)",
            None,
            "sql",
            ['schema "other" is not allowed'],
            id="schema-not-allowed",
        ),
        pytest.param(
            "INSERT INTO shop.secret (id) VALUES (1)",
            None,
            "sql",
            ['table "shop"."secret" is not allowed'],
            id="table-in-allowed-schema",
        ),
        pytest.param(
            "INSERT INTO mydb.public.orders (id) VALUES (1)",
            None,
            "sql",
            ["database-qualified"],
            id="database-qualified",
        ),
        pytest.param(
            "INSERT INTO orders (id) SELECT id FROM secret",
            None,
            "sql",
            ['"secret" is not allowed'],
            id="insert-select-source",
        ),
        pytest.param(
            "DELETE FROM orders WHERE id IN (SELECT order_id FROM pg_catalog.pg_authid)",
            None,
            "sql",
            ['schema "pg_catalog"'],
            id="subquery-in-where",
        ),
        pytest.param(
            "UPDATE orders SET total = 0 FROM secret s WHERE s.id = orders.id",
            None,
            "sql",
            ['"secret" is not allowed'],
            id="update-from",
        ),
        pytest.param(
            "WITH s AS (SELECT * FROM secret) INSERT INTO orders (id) SELECT id FROM s",
            None,
            "sql",
            ['"secret" is not allowed'],
            id="table-inside-cte",
        ),
        pytest.param(
            "WITH secret AS (SELECT 1) INSERT INTO secret VALUES (1)",
            None,
            "sql",
            ['"secret" is not allowed'],
            id="target-is-never-a-cte",
        ),
        pytest.param(
            "INSERT INTO orders (id) "
            "SELECT 1 FROM (WITH secret AS (SELECT 1) SELECT 1 FROM secret) s, secret",
            None,
            "sql",
            ['"secret" is not allowed'],
            id="cte-name-out-of-scope",
        ),
        pytest.param(
            "WITH a AS (SELECT * FROM b), b AS (SELECT 1) INSERT INTO orders (id) SELECT 1 FROM a",
            None,
            "sql",
            ['"b" is not allowed'],
            id="later-cte-not-visible",
        ),
        # writes hidden in WITH
        pytest.param(
            "WITH x AS (DELETE FROM customers RETURNING id) INSERT INTO orders (id) "
            "SELECT id FROM x",
            None,
            "sql",
            ["modify", "DELETE"],
            id="delete-in-with",
        ),
        pytest.param(
            "WITH x AS (UPDATE customers SET name = '' RETURNING id) DELETE FROM orders",
            None,
            "sql",
            ["modify", "UPDATE"],
            id="update-in-with",
        ),
        # columns
        pytest.param(
            "INSERT INTO payments (id, secret) VALUES (1, 2)",
            None,
            "sql",
            ['column "secret"', "amount, id"],
            id="insert-restricted-column",
        ),
        pytest.param(
            "INSERT INTO payments VALUES (1, 2)",
            None,
            "sql",
            ["name the columns", "allows only amount, id"],
            id="insert-without-columns",
        ),
        pytest.param(
            "UPDATE payments SET secret = 1 WHERE id = 1",
            None,
            "sql",
            ['column "secret"'],
            id="update-restricted-column",
        ),
        pytest.param(
            "INSERT INTO payments (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET secret = 1",
            None,
            "sql",
            ['column "secret"'],
            id="on-conflict-restricted-column",
        ),
        # functions
        pytest.param(
            "INSERT INTO orders (id) VALUES (pg_sleep(10))",
            None,
            "sql",
            ["function pg_sleep is not allowed"],
            id="pg-sleep",
        ),
        pytest.param(
            "UPDATE orders SET note = pg_catalog.PG_READ_FILE('/etc/passwd')",
            None,
            "sql",
            ["function pg_read_file is not allowed"],
            id="qualified-upper-case",
        ),
        pytest.param(
            'INSERT INTO orders (id) VALUES ("PG_SLEEP"(1))',
            None,
            "sql",
            ["function PG_SLEEP is not allowed"],
            id="quoted-upper-case",
        ),
        pytest.param(
            "DELETE FROM orders WHERE pg_try_advisory_lock(1)",
            None,
            "sql",
            ["pg_try_advisory_lock"],
            id="advisory-lock",
        ),
        pytest.param(
            "INSERT INTO orders (id) SELECT 1 FROM dblink_exec('x', 'y') AS t(a int)",
            None,
            "sql",
            ["dblink_exec"],
            id="dblink-in-from",
        ),
        pytest.param(
            "INSERT INTO orders (note) VALUES (current_setting('is_superuser'))",
            None,
            "sql",
            ["current_setting"],
            id="current-setting",
        ),
        pytest.param(
            "INSERT INTO orders (note) "
            "VALUES (query_to_xml('select * from secret', true, true, ''))",
            None,
            "sql",
            ["query_to_xml"],
            id="query-to-xml",
        ),
        pytest.param(
            "INSERT INTO orders (id) VALUES (lo_import('/etc/passwd'))",
            None,
            "sql",
            ["lo_import"],
            id="lo-import",
        ),
        # placeholders
        pytest.param(
            "INSERT INTO orders (id) VALUES ($1)",
            None,
            "sql",
            ["uses $1", "no params"],
            id="legacy-with-placeholder",
        ),
        pytest.param(
            "INSERT INTO orders (id, a, b) VALUES ($1, $2, $3)",
            [1, 2],
            "params",
            ["uses $3", "2 params were given"],
            id="too-few-params",
        ),
        pytest.param(
            "INSERT INTO orders (id) VALUES ($1)",
            [1, 2],
            "params",
            ["2 params were given", "only up to $1"],
            id="too-many-params",
        ),
        pytest.param(
            "INSERT INTO orders (id) VALUES (1)",
            [1],
            "params",
            ["1 param was given", "no placeholders"],
            id="params-without-placeholders",
        ),
        pytest.param(
            "INSERT INTO orders (id, b) VALUES ($1, $3)",
            [1, 2, 3],
            "sql",
            ["$2 is not used"],
            id="placeholder-gap",
        ),
        pytest.param(
            "INSERT INTO orders (id) VALUES ($0)", [], "sql", ["start at $1"], id="dollar-zero"
        ),
    ],
)
def test_refused(sql: str, params: list[Any] | None, field: str, words: list[str]) -> None:
    with pytest.raises(InvalidOperation) as caught:
        check_statement(sql, params, ALLOWED)
    assert caught.value.field == field
    for word in words:
        assert word in caught.value.reason


def test_parse_error_message_is_shortened() -> None:
    with pytest.raises(InvalidOperation) as caught:
        check_statement("INSERT INTO orders VALUES ('" + "x" * 1000, None, ALLOWED)
    assert "unterminated" in caught.value.reason
    assert len(caught.value.reason) < 250


def test_deeply_nested_expression_does_not_exhaust_recursion() -> None:
    sql = "INSERT INTO orders (id) VALUES (" + " + ".join(["$1"] * 5000) + ")"
    assert check_statement(sql, [1], ALLOWED) == CheckedStatement(ORDERS, "insert", 1)
