"""sqlguard and sqlscope: which caller SQL may run, and the reasons given when it may not."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import workload
from streamsvc import sqlguard
from streamsvc.allowlist import AllowList, TableRef
from streamsvc.errors import InvalidOperation
from streamsvc.sqlguard import MAX_SQL_BYTES, CheckedStatement, check_statement
from streamsvc.sqlscope import FUNCTIONS, MAX_SQL_DEPTH

ALLOWED = AllowList.parse("orders, customers, shop.items, payments(id, amount), users(id, name)")
ORDERS = TableRef("public", "orders")
USERS = TableRef("public", "users")
ORDERS_ONLY = frozenset({ORDERS})  # a key scoped to orders


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
            CheckedStatement(TableRef("public", "payments"), "upsert", 2),
            id="on-conflict-do-update-is-an-upsert",
        ),
        pytest.param(
            "INSERT INTO payments (id, amount) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            [1, 2],
            CheckedStatement(TableRef("public", "payments"), "insert", 2),
            id="on-conflict-do-nothing-stays-an-insert",
        ),
        pytest.param(
            "UPDATE payments SET amount = amount + 1 WHERE id = $1",
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
        pytest.param("UPDATE orders SET note = '\ud800'", None, "sql", ["Unicode"], id="surrogate"),
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
            ["function pg_catalog.pg_read_file is not allowed"],
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
            ["functions in FROM"],
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


# Each class of attack a key scoped to orders (insert, --allow-sql) was seen to try, and
# neighbours of each. Users are in the allow-list (with a column list) but not in the scope.
ATTACKS = [
    pytest.param(
        "INSERT INTO orders (id, note) SELECT id, password FROM users",
        "table public.users is outside the caller's scope",
        id="insert-select-from-other-table",
    ),
    pytest.param(
        "INSERT INTO orders (id, note) VALUES (1, (SELECT password FROM users LIMIT 1))",
        "table public.users is outside",
        id="scalar-subselect-in-values",
    ),
    pytest.param(
        "UPDATE orders SET note = (SELECT password FROM users LIMIT 1) WHERE id = 1",
        "table public.users is outside",
        id="scalar-subselect-in-set",
    ),
    pytest.param(
        "DELETE FROM orders WHERE id = (SELECT id FROM users WHERE password LIKE 'a%')",
        "table public.users is outside",
        id="scalar-subselect-in-where",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (1) "
        "ON CONFLICT (id) DO UPDATE SET note = (SELECT password FROM users LIMIT 1)",
        "table public.users is outside",
        id="scalar-subselect-in-on-conflict-set",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = 'x' "
        "WHERE EXISTS (SELECT 1 FROM users WHERE password LIKE 'a%')",
        "table public.users is outside",
        id="subselect-in-on-conflict-where",
    ),
    pytest.param(
        "INSERT INTO orders (id, note) TABLE users",
        "table public.users is outside",
        id="table-command",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT x FROM (TABLE users) x",
        "table public.users is outside",
        id="table-command-in-from",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (1) RETURNING (SELECT password FROM users LIMIT 1)",
        "RETURNING is not allowed",
        id="returning-subselect",
    ),
    pytest.param(
        "UPDATE orders SET note = 'x' RETURNING *", "RETURNING is not allowed", id="returning"
    ),
    pytest.param(
        "DELETE FROM orders o USING users u WHERE u.password LIKE 'a%'",
        "table public.users is outside",
        id="delete-using",
    ),
    pytest.param(
        "UPDATE orders SET note = 'x' FROM orders o2 JOIN users u ON true",
        "table public.users is outside",
        id="update-from-join",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES ((SELECT password FROM users LIMIT 1)::numeric)",
        "table public.users is outside",
        id="error-based-read",
    ),
    pytest.param(
        "WITH s AS (SELECT password FROM users) INSERT INTO orders (note) SELECT * FROM s",
        "table public.users is outside",
        id="cte",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT l.p FROM orders o, "
        "LATERAL (SELECT password AS p FROM users) l",
        "table public.users is outside",
        id="lateral",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT 'x' FROM orders "
        "WHERE EXISTS (SELECT 1 FROM (SELECT 1 FROM (SELECT 1 FROM users) a) b)",
        "table public.users is outside",
        id="deep-subselect",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO NOTHING; SELECT * FROM users",
        "exactly one statement",
        id="second-statement",
    ),
    pytest.param(
        "INSERT INTO payments (id, amount) VALUES (1, 1)",
        "table public.payments is outside the caller's scope",
        id="allowed-table-outside-scope",
    ),
    pytest.param(
        "UPDATE orders SET total = (SELECT amount FROM payments LIMIT 1)",
        "table public.payments is outside",
        id="allowed-table-outside-scope-read",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (ts_stat('SELECT password FROM users')::text)",
        "function ts_stat is not allowed",
        id="ts-stat",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (ts_rewrite('a'::tsquery, 'SELECT 1')::text)",
        "function ts_rewrite is not allowed",
        id="ts-rewrite",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (pg_read_file('/etc/passwd'))",
        "function pg_read_file is not allowed",
        id="pg-read-file",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (current_setting('data_directory'))",
        "function current_setting is not allowed",
        id="current-setting",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (set_config('search_path', 'pg_temp', false))",
        "function set_config is not allowed",
        id="set-config",
    ),
    pytest.param(
        "INSERT INTO orders (id) SELECT 1 WHERE pg_advisory_lock(42) IS NULL",
        "function pg_advisory_lock is not allowed",
        id="advisory-lock",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (nextval('payments_id_seq'))",
        "function nextval is not allowed",
        id="nextval",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (setval('payments_id_seq', 1))",
        "function setval is not allowed",
        id="setval",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT slot_name FROM pg_replication_slots",
        'table "pg_replication_slots" is not allowed',
        id="replication-slots",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT setting FROM pg_catalog.pg_settings",
        'schema "pg_catalog" is not allowed',
        id="pg-settings",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT rolpassword FROM pg_authid",
        'table "pg_authid" is not allowed',
        id="pg-authid",
    ),
    pytest.param(
        "INSERT INTO orders (note) SELECT column_name FROM information_schema.columns",
        'schema "information_schema" is not allowed',
        id="information-schema",
    ),
    pytest.param(
        "INSERT INTO orders (id) SELECT 1 FROM pg_temp.streamsvc_claim('x', 'y')",
        "functions in FROM",
        id="own-function-in-from",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (pg_temp.streamsvc_claim(ARRAY['x']::uuid[]))",
        "function pg_temp.streamsvc_claim is not allowed: only built-in",
        id="own-function-in-pg-temp",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (public.lower('x'))",
        "function public.lower is not allowed: only built-in",
        id="function-in-public",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (1 OPERATOR(pg_temp.+) 1)",
        "operator pg_temp.+ is not allowed",
        id="operator-in-pg-temp",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES ('x'::pg_temp.evil)",
        "type pg_temp.evil is not allowed",
        id="type-in-pg-temp",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES ('x' COLLATE pg_temp.evil)",
        "collation pg_temp.evil is not allowed",
        id="collation-in-pg-temp",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES ('pg_authid'::regclass::oid::int)",
        "type regclass is not allowed",
        id="regclass",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (current_user)",
        "session information",
        id="current-user",
    ),
    pytest.param(
        "INSERT INTO orders (id) SELECT i FROM generate_series(1, 10) i",
        "functions in FROM",
        id="set-returning-in-from",
    ),
    pytest.param(
        "INSERT INTO orders (id) VALUES (unnest(ARRAY[1, 2]))",
        "function unnest is not allowed",
        id="set-returning-in-values",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (query_to_xml('SELECT 1', true, true, '')::text)",
        "function query_to_xml is not allowed",
        id="query-to-xml",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (repeat('x', 1000000000))",
        "function repeat is not allowed",
        id="huge-output",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (xmlelement(name a, 'x')::text)",
        "XML functions is not allowed",
        id="xml",
    ),
    pytest.param(
        "INSERT INTO orders (note) VALUES (JSON_OBJECT('a': 1)::text)",
        "SQL/JSON functions is not allowed",
        id="sql-json",
    ),
    pytest.param(
        "INSERT INTO orders (id) SELECT id FROM orders FOR UPDATE",
        "FOR UPDATE/SHARE is not allowed",
        id="row-locks",
    ),
    pytest.param(
        "UPDATE orders SET note = 'x' WHERE CURRENT OF c",
        "WHERE CURRENT OF is not allowed",
        id="current-of",
    ),
    pytest.param(
        "INSERT INTO orders (id) SELECT id FROM orders TABLESAMPLE SYSTEM (10)",
        "TABLESAMPLE is not allowed",
        id="tablesample",
    ),
]


@pytest.mark.parametrize(("sql", "words"), ATTACKS)
def test_attacks_of_a_key_scoped_to_orders_are_refused(sql: str, words: str) -> None:
    with pytest.raises(InvalidOperation) as caught:
        check_statement(sql, None, ALLOWED, ORDERS_ONLY)
    assert caught.value.field == "sql"
    assert words in caught.value.reason


# users allows only id and name: nothing may read its other columns, however it is spelled.
COLUMN_READS = [
    pytest.param("SELECT password FROM users", 'column "password" is not allowed on users'),
    pytest.param("SELECT u.password FROM users u", 'column "u"."password" is not allowed'),
    pytest.param("SELECT users.password FROM users", 'column "users"."password"'),
    pytest.param("SELECT name FROM users WHERE password LIKE 'a%'", '"password" is not'),
    pytest.param("SELECT name FROM users ORDER BY password LIMIT 1", '"password" is not'),
    pytest.param("SELECT max(password) FROM users", '"password" is not allowed'),
    pytest.param("SELECT u::text FROM users u", "the whole row of u"),
    pytest.param("SELECT to_jsonb(u)::text FROM users u", "the whole row of u"),
    pytest.param("SELECT to_jsonb(users)::text FROM users", "the whole row of users"),
    pytest.param("SELECT (u).password FROM users u", "the whole row of u"),
    pytest.param("SELECT u.*::text FROM users u", '"u".* would read every column of u'),
    pytest.param("SELECT * FROM users", "* would read every column of users"),
    pytest.param("TABLE users", "* would read every column of users"),
    pytest.param("SELECT c FROM users AS u(a, b, c)", "column aliases on table users"),
    pytest.param("SELECT public.users.password FROM users", "write columns as name or alias"),
    pytest.param("SELECT j.password FROM (users JOIN orders o ON true) AS j", '"password"'),
    pytest.param("SELECT 'x' FROM users NATURAL JOIN orders", "NATURAL joins"),
    pytest.param("SELECT 'x' FROM users JOIN orders USING (password)", '"password" is not'),
    pytest.param(
        "SELECT (SELECT password) FROM users", '"password" is not allowed', id="correlated"
    ),
    pytest.param("SELECT 'x' FROM users s WHERE s.nope = 1", '"s"."nope"'),
    pytest.param("SELECT 'x' FROM users WHERE x.id = 1", 'no table or alias "x"'),
]


@pytest.mark.parametrize(("select", "words"), COLUMN_READS)
def test_columns_a_table_does_not_allow_are_never_read(select: str, words: str) -> None:
    with pytest.raises(InvalidOperation) as caught:
        check_statement(f"INSERT INTO orders (note) {select}", None, ALLOWED)
    assert caught.value.field == "sql"
    assert words in caught.value.reason


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        pytest.param(
            "DELETE FROM orders WHERE EXISTS (SELECT 1 FROM users WHERE password = orders.note)",
            '"password" is not allowed',
            id="exists",
        ),
        pytest.param(
            "UPDATE payments SET amount = 1 WHERE secret = 'x'",
            'column "secret" is not allowed on payments',
            id="where-on-target",
        ),
        pytest.param(
            "UPDATE payments p SET amount = p.secret",
            '"p"."secret" is not allowed',
            id="target-alias",
        ),
        pytest.param(
            "INSERT INTO payments (id, amount) VALUES (1, 2) "
            "ON CONFLICT (id) DO UPDATE SET amount = excluded.secret",
            '"excluded"."secret" is not allowed',
            id="excluded",
        ),
        pytest.param(
            "INSERT INTO payments (id, amount) VALUES (1, 2) ON CONFLICT (secret) DO NOTHING",
            'column "secret" is not allowed',
            id="conflict-target",
        ),
        pytest.param(
            "UPDATE orders SET note = 'x' FROM payments WHERE secret IS NULL",
            '"secret" is not allowed on payments',
            id="unqualified-in-update-from",
        ),
    ],
)
def test_restricted_columns_in_statement_clauses(sql: str, words: str) -> None:
    with pytest.raises(InvalidOperation) as caught:
        check_statement(sql, None, ALLOWED)
    assert words in caught.value.reason


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO orders (customer_id, note) SELECT u.id, u.name FROM users u WHERE u.id = 1",
        "INSERT INTO orders (note) SELECT name FROM users ORDER BY id DESC LIMIT 1",
        "INSERT INTO orders (n) SELECT count(*) FROM users",
        "INSERT INTO orders (note) SELECT upper(name) AS n FROM users ORDER BY n",
        "INSERT INTO orders (note) SELECT o.* FROM orders o",
        "INSERT INTO orders (note) SELECT to_jsonb(o)::text FROM orders o",
        "INSERT INTO orders (note) SELECT s.x FROM (SELECT name AS x FROM users) s",
        "INSERT INTO orders (note) SELECT s FROM (SELECT name FROM users) s",
        "UPDATE orders o SET note = c.name FROM customers c JOIN users u ON u.id = c.id "
        "WHERE o.id = c.id",
        "DELETE FROM orders WHERE customer_id IN (SELECT id FROM users WHERE name = 'bob')",
        "UPDATE orders SET note = COALESCE(note, '') || NULLIF('a', 'b') || "
        "GREATEST(1, 2)::text WHERE id = 1",
        "UPDATE orders SET note = CASE WHEN total > 10 THEN 'big' ELSE 'small' END",
        "UPDATE orders SET meta = jsonb_set(meta, '{a}', to_jsonb(now())) WHERE id = 1",
        "UPDATE orders SET at = date_trunc('day', now() AT TIME ZONE 'utc') + "
        "make_interval(days => 1)",
        "INSERT INTO orders (id, note, at) VALUES (1, trim(both ' ' from 'x'), CURRENT_DATE)",
        "INSERT INTO orders (id, uid) VALUES (1, gen_random_uuid())",
        "INSERT INTO orders (status) VALUES ('paid'::public.order_status)",
        "INSERT INTO orders (id) VALUES (1 OPERATOR(pg_catalog.+) 1)",
        "INSERT INTO orders (note) VALUES (pg_catalog.lower('X'))",
        "INSERT INTO orders (note) SELECT name FROM users JOIN customers USING (id)",
        "DELETE FROM orders WHERE note ~ '^x' AND note LIKE 'x%' ESCAPE '!'",
    ],
)
def test_statements_inside_the_scope_are_accepted(sql: str) -> None:
    assert check_statement(sql, None, ALLOWED).table == ORDERS


def test_the_key_scope_does_not_narrow_what_it_holds() -> None:
    sql = "UPDATE orders SET note = c.name FROM customers c WHERE c.id = orders.customer_id"
    scope = frozenset({ORDERS, TableRef("public", "customers")})
    assert check_statement(sql, None, ALLOWED, scope) == CheckedStatement(ORDERS, "update", 0)
    with pytest.raises(InvalidOperation, match="customers is outside the caller's scope"):
        check_statement(sql, None, ALLOWED, ORDERS_ONLY)


def test_a_statement_longer_than_the_limit_is_refused_before_parsing() -> None:
    # The 25,000-term sum that once crashed the process inside the parser.
    sql = "INSERT INTO orders (id) VALUES (" + "+".join(["1"] * 25_000) + ")"
    with pytest.raises(InvalidOperation) as caught:
        check_statement(sql, None, ALLOWED)
    assert caught.value.reason == f"is longer than {MAX_SQL_BYTES} bytes"


def test_the_length_limit_counts_utf8_bytes() -> None:
    head = "INSERT INTO orders (note) VALUES ('"
    fits = head + "x" * (MAX_SQL_BYTES - len(head) - 2) + "')"
    assert check_statement(fits, None, ALLOWED).action == "insert"
    wide = head + "é" * ((MAX_SQL_BYTES - len(head)) // 2) + "')"  # fewer chars than bytes
    assert len(wide) < MAX_SQL_BYTES
    with pytest.raises(InvalidOperation, match="longer than"):
        check_statement(wide, None, ALLOWED)


def test_expressions_nested_deeper_than_the_limit_are_refused() -> None:
    shallow = "INSERT INTO orders (id) VALUES (" + " + ".join(["$1"] * 500) + ")"
    assert check_statement(shallow, [1], ALLOWED) == CheckedStatement(ORDERS, "insert", 1)
    deep = "INSERT INTO orders (id) VALUES (" + "+".join(["$1"] * 2_000) + ")"
    with pytest.raises(InvalidOperation) as caught:
        check_statement(deep, [1], ALLOWED)
    assert caught.value.reason == f"nests more than {MAX_SQL_DEPTH} levels deep"


def test_right_nesting_the_parser_cannot_take_is_refused() -> None:
    sql = "INSERT INTO orders (id) VALUES (" + "(" * 12_000 + "1)"
    with pytest.raises(InvalidOperation) as caught:
        check_statement(sql, None, ALLOWED)
    assert caught.value.reason == "nests too deeply for the SQL parser"


_HEAD, _TAIL = "INSERT INTO orders (id) VALUES (", ")"


def _chain(first: str, step: str, last: str = "") -> str:
    """``first``, as many ``step`` as the length limit lets an INSERT hold, ``last``."""
    room = MAX_SQL_BYTES - len(_HEAD) - len(_TAIL) - len(first) - len(last)
    return _HEAD + first + step * (room // len(step)) + last + _TAIL


def _nest(opening: str, inner: str, closing: str) -> str:
    """``inner`` inside as many ``opening ... closing`` as the length limit lets fit."""
    room = MAX_SQL_BYTES - len(_HEAD) - len(_TAIL) - len(inner)
    n = room // (len(opening) + len(closing))
    return _HEAD + opening * n + inner + closing * n + _TAIL


# The shapes that nest deepest per byte: left-deep chains (each level one more call in the
# parser's C recursion that builds the tree) and right nesting, which the parser's own
# stack bounds too. Each as long as the limit allows, and the input that crashed the process.
WORST = {
    "sum": _chain("1", "+1"),
    "concatenation": _chain("'a'", "||'a'"),
    "casts": _chain("1", "::int"),
    "json-path": _chain("'{}'::jsonb", "->'a'"),
    "is-null": _chain("1", " IS NULL"),
    "collate": _chain("'a'", ' COLLATE "C"'),
    "at-time-zone": _chain("now()", " AT TIME ZONE 'utc'"),
    "union": _nest("(SELECT 1 UNION ", "SELECT 1", ")"),
    "joins": "INSERT INTO orders (id) SELECT 1 FROM orders"
    + " JOIN orders o ON true" * ((MAX_SQL_BYTES - 50) // 22),
    "unary-signs": _chain("1", "+-+-+-+1"),  # each run of signs short enough to lex
    "sign-run": _chain("", "+-", "1"),
    "comment-openings": _chain("", "/*"),
    "parentheses": _nest("(", "1", ")"),
    "sub-selects": _nest("(SELECT ", "1", ")"),
    "case": _nest("CASE WHEN true THEN ", "1", " END"),
    "function-calls": _nest("lower(", "'x'", ")"),
    "not": _nest("NOT ", "true", ""),
    "arrays": _nest("ARRAY[", "1", "]"),
    "row": _nest("ROW(", "1", ")"),
    "in-list": _chain("1 IN (1", ",1", ")"),
    "case-chain": _chain("CASE", " WHEN 1=1 THEN 1", " END"),
    "the-crash-of-the-issue": _HEAD + "+".join(["1"] * 25_000) + _TAIL,
}
_PROBE = """
import sys, threading
from streamsvc.allowlist import AllowList
from streamsvc.errors import InvalidOperation
from streamsvc.sqlguard import check_statement

allowed = AllowList.parse("orders")
outcome = []

def check():
    try:
        outcome.append(str(check_statement(sys.stdin.read(), None, allowed)))
    except InvalidOperation as exc:
        outcome.append(exc.reason)

threading.stack_size(256 * 1024)  # a caller on a small stack: the parser has its own
thread = threading.Thread(target=check)
thread.start()
thread.join()
print(outcome[0])
"""


@pytest.mark.parametrize("name", list(WORST))
def test_the_deepest_inputs_are_answered_never_a_crash(name: str) -> None:
    # In a subprocess: a crash shows as a failed test, not as a dead pytest.
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        input=WORST[name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    answer = done.stdout.strip()
    assert answer, done.stderr[-2000:]
    if name == "the-crash-of-the-issue":
        assert answer == f"is longer than {MAX_SQL_BYTES} bytes"


# -- property-based: no text makes the check fail otherwise than with a refusal -------------

_WORDS = [
    *("INSERT", "INTO", "UPDATE", "DELETE", "FROM", "SELECT", "VALUES", "SET", "WHERE"),
    *("WITH", "AS", "ON", "CONFLICT", "DO", "NOTHING", "RETURNING", "USING", "JOIN", "TABLE"),
    *("LATERAL", "UNION", "CASE", "WHEN", "THEN", "ELSE", "END", "NOT", "AND", "OR", "IN"),
    *("EXISTS", "NULL", "IS", "DEFAULT", "ORDER", "BY", "LIMIT", "OPERATOR", "COLLATE"),
    *("orders", "users", "payments", "secrets", "pg_temp", "pg_catalog", "public", "o", "u"),
    *("id", "note", "name", "password", "excluded", "*", ".", ",", "(", ")", "[", "]", ";"),
    *("::", "=", "+", "-", "||", "->", "$1", "$2", "1", "'a'", '"x"', "lower", "now()"),
    *("pg_sleep", "nextval", "row_to_json", "json_object", "xmlelement", "--", "/*", "*/"),
]


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=()), max_size=200))
def test_any_text_is_answered_or_refused(sql: str) -> None:
    _answered(sql)
    _answered(f"INSERT INTO orders (note) VALUES ('{sql}')")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=40).map(" ".join))
def test_sql_like_text_is_answered_or_refused(sql: str) -> None:
    _answered("INSERT INTO orders " + sql)
    _answered(sql)


def _answered(sql: str) -> None:
    """check_statement returns or refuses; anything else raised fails the test."""
    try:
        check_statement(sql, None, ALLOWED, IN_SCOPE)
    except InvalidOperation as refused:
        assert refused.field in ("sql", "params")
        assert refused.reason


# -- property-based: one element outside the scope anywhere is always refused ---------------

# The key may touch orders, customers and users; users allows only id and name.
IN_SCOPE = frozenset({ORDERS, TableRef("public", "customers"), USERS})
_HOLE = "\N{SECTION SIGN}"
_LEAVES = st.sampled_from(["1", "'a'", "id", "now()", "NULL", "lower('A')", "(id + 1)"])
# (the bad element, a word its refusal names)
_OUTSIDE = [
    ("(SELECT 1 FROM secrets LIMIT 1)", '"secrets" is not allowed'),
    ("(SELECT 1 FROM payments LIMIT 1)", "payments is outside the caller's scope"),
    ("(SELECT 1 FROM pg_catalog.pg_authid LIMIT 1)", 'schema "pg_catalog"'),
    ("(SELECT password FROM users LIMIT 1)", '"password" is not allowed'),
    ("(SELECT u.password FROM users u LIMIT 1)", '"password" is not allowed'),
    ("(SELECT to_jsonb(u) FROM users u LIMIT 1)", "whole row of u"),
    ("pg_sleep(1)", "function pg_sleep"),
    ("pg_temp.streamsvc_claim(1)", "function pg_temp.streamsvc_claim"),
    ("nextval('orders_id_seq')", "function nextval"),
    ("public.lower('a')", "function public.lower"),
    ("(1 OPERATOR(pg_temp.+) 1)", "operator pg_temp.+"),
]
_TEMPLATES = [
    "INSERT INTO orders (id, note) VALUES (1, {a}), ({b}, 2)",
    "INSERT INTO orders (note) SELECT {a} FROM orders o WHERE {b} IS NOT NULL",
    "INSERT INTO orders (note) SELECT c.name FROM customers c JOIN orders o ON {a} = {b}",
    "UPDATE orders SET note = {a} WHERE id = {b}",
    "UPDATE orders o SET note = c.name FROM customers c WHERE c.id = {a} AND {b} IS NULL",
    "DELETE FROM orders WHERE id = {a} OR id IN (SELECT id FROM customers WHERE id = {b})",
    "DELETE FROM orders USING customers c WHERE c.id = {a} AND orders.id = {b}",
    "INSERT INTO orders (id) VALUES ({a}) ON CONFLICT (id) DO UPDATE SET note = {b}",
    "WITH w AS (SELECT {a} AS x FROM customers) INSERT INTO orders (note) SELECT {b} FROM w",
]


def _with_hole(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Expressions around one hole, the other operands harmless."""
    forms = [
        "({h} + {x})",
        "({x} || {h})",
        "lower({h})",
        "coalesce({x}, {h})",
        "CASE WHEN {x} = 1 THEN {h} ELSE {x} END",
        "(SELECT {h} FROM orders WHERE id = {x} LIMIT 1)",
        "(SELECT max(id) FROM users WHERE id = {h})",
        "EXISTS (SELECT 1 FROM customers c WHERE c.id = {h})",
        "ARRAY[{x}, {h}]",
        "({h})::text",
    ]
    return st.tuples(st.sampled_from(forms), inner, _LEAVES).map(
        lambda t: t[0].format(h=t[1], x=t[2])
    )


_HOLED = st.recursive(st.just(_HOLE), _with_hole, max_leaves=6)


@settings(max_examples=400, deadline=None)
@given(
    template=st.sampled_from(_TEMPLATES),
    holed=_HOLED,
    other=st.recursive(_LEAVES, lambda e: _with_hole(e).map(lambda s: s.replace(_HOLE, "1"))),
    first=st.booleans(),
    outside=st.sampled_from(_OUTSIDE),
)
def test_one_element_outside_the_scope_is_always_refused(
    template: str, holed: str, other: str, first: bool, outside: tuple[str, str]
) -> None:
    a, b = (holed, other) if first else (other, holed)
    inside = template.format(a=a, b=b)
    assert check_statement(inside.replace(_HOLE, "1"), None, ALLOWED, IN_SCOPE).table == ORDERS
    element, words = outside
    with pytest.raises(InvalidOperation) as caught:
        check_statement(inside.replace(_HOLE, element), None, ALLOWED, IN_SCOPE)
    assert caught.value.field == "sql"
    assert words in caught.value.reason


_SQL_SYNTAX = {"extract": "extract(year FROM now())", "position": "position('a' IN note)"}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_allowed_function_may_be_called_plain_or_in_pg_catalog(name: str) -> None:
    calls = (
        [_SQL_SYNTAX[name]]
        if name in _SQL_SYNTAX
        else [f"{name}(note)", f"pg_catalog.{name}(note)"]
    )
    for call in calls:
        sql = f"INSERT INTO orders (note) SELECT {call} FROM orders"
        assert check_statement(sql, None, ALLOWED, ORDERS_ONLY).table == ORDERS


@pytest.mark.parametrize(
    "name",
    [
        *("pg_sleep", "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file"),
        *("lo_import", "lo_export", "dblink", "current_setting", "set_config"),
        *("pg_advisory_lock", "pg_advisory_xact_lock", "pg_try_advisory_lock"),
        *("nextval", "setval", "currval", "lastval", "pg_terminate_backend"),
        *("pg_cancel_backend", "pg_reload_conf", "pg_notify", "txid_current"),
        *("ts_stat", "ts_rewrite", "query_to_xml", "table_to_xml", "cursor_to_xml", "xpath"),
        *("generate_series", "unnest", "jsonb_array_elements", "regexp_matches"),
        *("json_populate_record", "pg_get_viewdef", "has_table_privilege", "version"),
        *("pg_backend_pid", "random", "repeat", "lpad", "rpad", "row_to_json", "format"),
        *("pg_logical_slot_get_changes", "pg_create_logical_replication_slot"),
        *("pg_switch_wal", "pg_stat_get_activity", "inet_server_addr", "streamsvc_claim"),
    ],
)
def test_functions_off_the_list_are_refused_however_qualified(name: str) -> None:
    for qualified in (name, f"pg_catalog.{name}", f"public.{name}", f"pg_temp.{name}"):
        with pytest.raises(InvalidOperation) as caught:
            check_statement(f"INSERT INTO orders (note) VALUES ({qualified}('x'))", None, ALLOWED)
        assert f"function {qualified} is not allowed" in caught.value.reason


@pytest.mark.parametrize(
    "expression",
    [
        "note SIMILAR TO 'a%'",
        "note IS DISTINCT FROM 'a'",
        "id BETWEEN 1 AND 2",
        "id = ANY(ARRAY[1, 2])",
        "substring(note FROM 1 FOR 2) = 'ab'",
        "overlay(note PLACING 'x' FROM 1) = 'x'",
        "(now(), now()) OVERLAPS (now(), now())",
        "CURRENT_TIMESTAMP > now() - interval '1 day'",
        "LOCALTIMESTAMP(3) IS NOT NULL",
        "note IS NOT TRUE",
        "trim(leading 'x' FROM note) <> ''",
        "normalize(note) = note",
        "note COLLATE \"C\" > 'a'",
        "(SELECT count(*) FILTER (WHERE id > 1) FROM orders) > 0",
        "id IN (SELECT max(id) OVER (PARTITION BY note) FROM orders)",
        "EXISTS (SELECT 1 FROM orders GROUP BY note HAVING count(*) > 1)",
    ],
)
def test_builtin_syntax_is_accepted(expression: str) -> None:
    sql = f"DELETE FROM orders WHERE {expression}"
    assert check_statement(sql, None, ALLOWED, ORDERS_ONLY).action == "delete"


def test_the_benchmark_statement_is_accepted_for_a_key_scoped_to_its_table() -> None:
    allowed = AllowList.parse(workload.ALLOWED)
    counters = TableRef("public", "counters")
    checked = check_statement(workload.INCREMENT_SQL, ["k1"], allowed, frozenset({counters}))
    assert checked == CheckedStatement(counters, "update", 1)


def test_a_verdict_is_remembered_refusal_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same text again is answered from memory, with the same words: a caller resending
    an expensive statement costs the parser nothing more."""
    parsed: list[str] = []
    analyse = sqlguard._analyse

    def counting(sql: str, *args: Any) -> Any:
        parsed.append(sql)
        return analyse(sql, *args)

    monkeypatch.setattr(sqlguard, "_analyse", counting)
    nonce = uuid.uuid4().int % 10**12  # texts of their own, not met before in this process
    refused = f"INSERT INTO orders (id) SELECT {nonce} FROM pg_authid"
    accepted = f"INSERT INTO orders (id) VALUES ({nonce})"
    reasons = []
    for _ in range(3):
        with pytest.raises(InvalidOperation) as caught:
            check_statement(refused, None, ALLOWED)
        reasons.append(caught.value.reason)
        check_statement(accepted, None, ALLOWED)
    assert parsed == [refused, accepted]
    assert len(set(reasons)) == 1 and "pg_authid" in reasons[0]
    assert sqlguard.remembered(refused, ALLOWED) and sqlguard.remembered(accepted, ALLOWED)


def test_many_refused_texts_do_not_push_accepted_verdicts_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hostile caller sending a stream of distinct bad texts cannot make every other
    caller's accepted statement be parsed again: refusals are remembered apart."""
    monkeypatch.setattr(sqlguard, "REMEMBERED_REFUSALS", 4)
    nonce = uuid.uuid4().int % 10**12
    accepted = f"INSERT INTO orders (id) VALUES ({nonce})"
    check_statement(accepted, None, ALLOWED)
    for n in range(sqlguard.REMEMBERED + 10):
        with pytest.raises(InvalidOperation):
            check_statement(
                f"INSERT INTO orders (id) SELECT {nonce + n} FROM pg_authid", None, ALLOWED
            )
    assert sqlguard.remembered(accepted, ALLOWED)
    assert len(sqlguard._refused) <= 4
