"""PostgreSQL enforces the allow-list too: callers' statements run as the caller role.

The SQL check is switched off here (every statement is stored as the caller sent it), so
what stops each attack below is PostgreSQL alone: the operation ends FAIL with the
database's message, nothing of it is applied, and the good operations of the same batch
succeed. What PostgreSQL cannot refuse (changing an ordinary setting, a session advisory
lock) is shown not to outlast its batch.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from streamsvc import sqlguard
from streamsvc.adapters import caller_role
from streamsvc.allowlist import AllowList, TableRef
from streamsvc.errors import NotMigratedError
from streamsvc.model import Receipt
from streamsvc.settings import Settings
from streamsvc.validate import ANONYMOUS
from tests.conftest import ALLOWED, make_settings
from tests.pipeline import drain, ops, order, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROLE = caller_role.DEFAULT
USERS = """
CREATE TABLE users (id serial PRIMARY KEY, password text);
INSERT INTO users (password) VALUES ('hunter2');
INSERT INTO secrets VALUES (1, '42');
INSERT INTO profiles VALUES (1, 'ann', 'hash-of-ann');
INSERT INTO orders (id, customer, amount) VALUES (1, 'first', 1);
"""
VICTIM = "7d0a1d9e-0000-4000-8000-000000000001"  # another caller's pending operation


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The SQL check switched off: every statement is taken as an INSERT into orders."""

    def accept(sql: str, params: list[Any] | None, *_: Any, **__: Any) -> Any:
        return sqlguard.CheckedStatement(TableRef("public", "orders"), "insert", len(params or ()))

    monkeypatch.setattr(sqlguard, "check_statement", accept)
    yield


def raw(sql: str, *params: Any) -> dict[str, Any]:
    """A statement operation (a legacy one, without params, when none are given)."""
    op: dict[str, Any] = {"operationType": "RAW", "sql": sql}
    return {**op, "params": list(params)} if params else op


INTO_ORDERS = "INSERT INTO orders (id, customer, amount) "
# (what is tried, the statement, words of PostgreSQL's refusal)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "read another table with INSERT ... SELECT",
        raw(INTO_ORDERS + "SELECT 100, password, 1 FROM users"),
        "permission denied for table users",
    ),
    (
        "read another table in a scalar sub-select",
        raw(INTO_ORDERS + "VALUES ($1, (SELECT secret FROM secrets LIMIT 1), 1)", 101),
        "permission denied for table secrets",
    ),
    (
        "an error-based read",
        raw("UPDATE orders SET amount = (SELECT secret FROM secrets)::numeric WHERE id = 1"),
        "permission denied for table secrets",
    ),
    (
        "a whole-row reference",
        raw(INTO_ORDERS + "SELECT 102, s::text, 1 FROM secrets AS s"),
        "permission denied for table secrets",
    ),
    (
        "DELETE ... USING another table",
        raw("DELETE FROM orders USING secrets WHERE orders.id = secrets.id"),
        "permission denied for table secrets",
    ),
    (
        "RETURNING a sub-select",
        raw("UPDATE orders SET note = 'r' WHERE id = 1 RETURNING (SELECT secret FROM secrets)"),
        "permission denied for table secrets",
    ),
    (
        "read a column that is not allowed",
        raw("UPDATE orders SET note = (SELECT password_hash FROM profiles LIMIT 1) WHERE id = 1"),
        "permission denied for table profiles",
    ),
    (
        "write a column that is not allowed",
        raw("UPDATE profiles SET password_hash = $1 WHERE id = 1", "x"),
        "permission denied for table profiles",
    ),
    (
        "read the service's own table",
        raw(INTO_ORDERS + 'SELECT 103, body::text, 1 FROM "BatchOperations" LIMIT 1'),
        "permission denied for table BatchOperations",
    ),
    (
        "read API keys",
        raw(INTO_ORDERS + "SELECT 104, name, 1 FROM streamsvc_api_keys"),
        "permission denied for table streamsvc_api_keys",
    ),
    (
        "read a file",
        raw(INTO_ORDERS + "VALUES (105, pg_read_file('/etc/hostname'), 1)"),
        "permission denied for function pg_read_file",
    ),
    (
        "list a directory",
        raw(INTO_ORDERS + "SELECT 106, d, 1 FROM pg_ls_dir('.') AS d"),
        "permission denied for function pg_ls_dir",
    ),
    (
        "import a server file",
        raw(INTO_ORDERS + "VALUES (107, lo_import('/etc/hostname')::text, 1)"),
        "permission denied for function lo_import",
    ),
    (
        "run SQL text through ts_stat",
        raw(
            INTO_ORDERS
            + "SELECT 108, word, 1 FROM ts_stat('SELECT to_tsvector(password) FROM users')"
        ),
        "permission denied for table users",
    ),
    (
        "run SQL text through query_to_xml",
        raw(INTO_ORDERS + "VALUES (109, query_to_xml('TABLE secrets', true, true, '')::text, 1)"),
        "permission denied for table secrets",
    ),
    (
        "read a superuser-only setting",
        raw(INTO_ORDERS + "VALUES (110, current_setting('data_directory'), 1)"),
        "pg_read_all_settings",
    ),
    (
        "reload the server's configuration",
        raw(INTO_ORDERS + "VALUES (111, pg_reload_conf()::text, 1)"),
        "permission denied for function pg_reload_conf",
    ),
    (
        "read a replication slot",
        raw(INTO_ORDERS + "SELECT 112, data, 1 FROM pg_logical_slot_peek_changes('s', NULL, 1)"),
        "replication",
    ),
    (
        "terminate the service's own session",
        raw(INTO_ORDERS + "VALUES (113, pg_terminate_backend(pg_backend_pid())::text, 1)"),
        "terminate",
    ),
    (
        "move another table's sequence (nextval)",
        raw(INTO_ORDERS + "VALUES (nextval('users_id_seq'), 'n', 1)"),
        "permission denied for sequence users_id_seq",
    ),
    (
        "move another table's sequence (setval)",
        raw(INTO_ORDERS + "VALUES (114, setval('users_id_seq', 1000)::text, 1)"),
        "permission denied for sequence users_id_seq",
    ),
    (
        "claim another caller's operation",
        raw(
            INTO_ORDERS + "SELECT 115, op_id, 1 FROM "
            "pg_temp.streamsvc_claim(ARRAY[$1]::uuid[], gen_random_uuid())",
            VICTIM,
        ),
        "permission denied for function streamsvc_claim",
    ),
    (
        "mark another caller's operation",
        raw(
            "UPDATE orders SET note = pg_temp.streamsvc_mark_failed(ARRAY[$1]::uuid[], "
            "ARRAY['x'])::text WHERE id = 1",
            VICTIM,
        ),
        "permission denied for function streamsvc_mark_failed",
    ),
    (
        "run text as the caller role's own function",
        raw(
            "UPDATE orders SET note = "
            "pg_temp.streamsvc_as_caller('CREATE TEMP TABLE t (x int)', NULL)::text"
        ),
        "permission denied for function streamsvc_as_caller",
    ),
    (
        "switch back to the login's role",
        raw(INTO_ORDERS + "VALUES (116, set_config('role', current_user, true), 1)"),
        'cannot set parameter "role" within security-definer function',
    ),
    (
        "drop the role",
        raw(INTO_ORDERS + "VALUES (117, set_config('role', 'none', true), 1)"),
        'cannot set parameter "role" within security-definer function',
    ),
    (
        "change the session's user",
        raw(
            INTO_ORDERS + "VALUES (118, set_config('session_authorization', session_user, true), 1)"
        ),
        'cannot set parameter "session_authorization" within security-definer function',
    ),
    (
        "a second statement riding along (DDL shadowing the service's table)",
        raw(INTO_ORDERS + "VALUES (119, 'x', 1); CREATE TEMP TABLE \"BatchOperations\" (id uuid)"),
        "syntax error",
    ),
    (
        "the same, closing the WITH the statement runs in",
        raw(
            INTO_ORDERS + "VALUES (120, 'x', 1)) SELECT; "
            'CREATE TEMP TABLE "BatchOperations" (id uuid); WITH x AS (SELECT 1'
        ),
        "cannot open multi-query plan as cursor",
    ),
    ("something else than one INSERT, UPDATE or DELETE", raw("SET ROLE NONE"), "syntax error"),
    ("transaction control", raw("COMMIT"), "syntax error"),
    (
        "a text PostgreSQL's scanner cannot read",
        raw(INTO_ORDERS + "VALUES (121, 'x"),
        "unterminated quoted string",
    ),
]


async def test_postgresql_refuses_what_the_allow_list_does_not_grant(
    settings: Settings, conn: asyncpg.Connection, unchecked: None
) -> None:
    await conn.execute(USERS)
    await conn.execute(
        """INSERT INTO "BatchOperations" (id, operation_type, body, source, submitted_by)
           VALUES ($1, 'OTHER', '{}', 'api', 'another')""",
        uuid.UUID(VICTIM),
    )
    sequence = await conn.fetchval("SELECT last_value FROM users_id_seq")
    good = [order(10), raw("UPDATE orders SET note = $1 WHERE id = 1", "kept"), order(11)]
    batch = [good[0], *(op for _, op, _ in REFUSED), good[1], good[2]]
    async with running(settings) as service:
        results = await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        assert all(isinstance(r, Receipt) for r in results), "stored unchecked"
        await drain(service)
    rows = await conn.fetch('SELECT id::text, status, error, batch_id FROM "BatchOperations"')
    by_id = {r[0]: r for r in rows}
    ids = [r.id for r in results if isinstance(r, Receipt)]
    failures = []
    for (name, _, words), op_id in zip(REFUSED, ids[1:-2], strict=True):
        status, error = by_id[op_id][1], by_id[op_id][2]
        if status != "FAIL" or words not in (error or ""):
            failures.append(f"{name}: {status} {error!r}")
    assert failures == []
    assert [by_id[i][1] for i in (ids[0], ids[-2], ids[-1])] == ["SUCCESS"] * 3
    assert len({by_id[i][3] for i in ids}) == 1, "one batch"
    # nothing of the refused applied; the good ones did
    assert await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM orders") == [1, 10, 11]
    assert await conn.fetchval("SELECT note FROM orders WHERE id = 1") == "kept"
    assert await conn.fetchval("SELECT last_value FROM users_id_seq") == sequence
    assert await conn.fetchval("SELECT password_hash FROM profiles") == "hash-of-ann"
    assert by_id[VICTIM][1] == "UNPROCESSED"
    assert await conn.fetchval("SELECT to_regclass('pg_temp.\"BatchOperations\"')") is None


async def test_every_path_applies_as_the_caller_role(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """A trigger records who wrote each row: structured operations (with a column-limited
    table, an upsert and a delete among them), statements and legacy statements all run
    as the caller role, and apply."""
    await conn.execute("""
        CREATE FUNCTION writer() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN NEW.note := current_user; RETURN NEW; END $$;
        CREATE TRIGGER writer BEFORE INSERT OR UPDATE ON orders
            FOR EACH ROW EXECUTE FUNCTION writer();
        INSERT INTO profiles VALUES (2, 'old', 'h'), (3, 'gone', 'h');
    """)
    profile = {"operationType": "P", "table": "profiles"}
    batch = [
        order(1),
        raw(INTO_ORDERS + "VALUES ($1, $2, $3)", 2, "c", "1.5"),
        raw(INTO_ORDERS + "VALUES (3, 'legacy 50%', 1);"),
        {**profile, "action": "insert", "values": {"id": 1, "name": "new"}},
        {**profile, "action": "upsert", "values": {"name": "renamed"}, "key": {"id": 2}},
        {**profile, "action": "delete", "key": {"id": 3}},
    ]
    async with running(settings) as service:
        await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await drain(service)
    statuses = await conn.fetch('SELECT status, error FROM "BatchOperations"')
    assert {tuple(r) for r in statuses} == {("SUCCESS", None)}
    writers = await conn.fetch("SELECT id, customer, amount, note FROM orders ORDER BY id")
    assert [tuple(r) for r in writers] == [
        (1, "c", 1, ROLE),
        (2, "c", 1.5, ROLE),
        (3, "legacy 50%", 1, ROLE),
    ]
    profiles = await conn.fetch("SELECT id, name FROM profiles ORDER BY id")
    assert [tuple(r) for r in profiles] == [(1, "new"), (2, "renamed")]


async def test_every_statement_of_a_group_is_held_as_the_first(
    database: str, prefix: str, conn: asyncpg.Connection, unchecked: None
) -> None:
    """Operations sharing one statement text run in one probe of the caller role's, the
    first checked wrapped in a WITH, the others as they are or prepared: a second
    statement in the text is refused for every one of them; the ones after the first,
    prepared ones too, still run as the role and cannot leave it; and no statement
    prepared for them is left on the connection (the only one: pool of one)."""
    settings = make_settings(database, prefix, STREAMSVC_DB_POOL_SIZE="1")
    await conn.execute(
        "INSERT INTO orders (id, customer, amount) SELECT i, 'c', 1 FROM generate_series(1, 6) i"
    )
    riding = (
        INTO_ORDERS + "VALUES ($1, 'x', 1)) SELECT; "
        'CREATE TEMP TABLE "BatchOperations" (id uuid); WITH x AS (SELECT 1'
    )
    switching = (
        "UPDATE orders SET note = CASE WHEN $2 THEN set_config('role', session_user, false) "
        "ELSE current_user END WHERE id = $1"
    )
    batch = [raw(riding, n) for n in (130, 131, 132, 133, 134)]
    batch += [raw(switching, n, n == 2) for n in range(1, 7)]
    async with running(settings) as service:
        results = await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await drain(service)
        async with service.pool.acquire() as pooled:
            prepared = await pooled.fetch("SELECT name FROM pg_prepared_statements")
    assert [r[0] for r in prepared if r[0].startswith("streamsvc")] == []
    ids = [r.id for r in results if isinstance(r, Receipt)]
    rows = await conn.fetch('SELECT id::text, status, error FROM "BatchOperations"')
    by_id = {r[0]: (r[1], r[2] or "") for r in rows}
    for op_id in ids[:5]:
        assert by_id[op_id][0] == "FAIL"
        assert "cannot open multi-query plan as cursor" in by_id[op_id][1]
    assert [by_id[i][0] for i in ids[5:]] == ["SUCCESS", "FAIL", *["SUCCESS"] * 4]
    assert 'cannot set parameter "role" within security-definer function' in by_id[ids[6]][1]
    notes = await conn.fetch("SELECT id, note FROM orders ORDER BY id")
    assert [tuple(r) for r in notes] == [(1, ROLE), (2, None), *((i, ROLE) for i in range(3, 7))]
    assert await conn.fetchval("SELECT to_regclass('pg_temp.\"BatchOperations\"')") is None


async def test_what_postgresql_cannot_refuse_does_not_outlast_its_batch(
    database: str, prefix: str, conn: asyncpg.Connection, unchecked: None
) -> None:
    """A setting changed for the session and a session advisory lock are allowed to any
    role: the connection (the only one: pool of one) is cleaned after the batch, so the
    next batch and the next user of the connection see neither."""
    settings = make_settings(database, prefix, STREAMSVC_DB_POOL_SIZE="1")
    await conn.execute("INSERT INTO orders (id, customer, amount) VALUES (1, 'c', 1), (2, 'c', 1)")
    default = await conn.fetchval("SHOW work_mem")
    first = [
        raw("UPDATE orders SET note = set_config('work_mem', '77MB', false) WHERE id = 1"),
        raw("UPDATE orders SET note = pg_advisory_lock(4242)::text || 'locked' WHERE id = 2"),
    ]
    second = [raw("UPDATE orders SET note = current_setting('work_mem') WHERE id = 2")]
    async with running(settings) as service:
        await service.ingress.submit(ops(first), caller=ANONYMOUS, source="api")
        await drain(service)
        assert await conn.fetchval("SELECT pg_try_advisory_lock(4242)"), "released"
        await conn.fetchval("SELECT pg_advisory_unlock(4242)")
        assert await conn.fetchval("SELECT note FROM orders WHERE id = 1") == "77MB"
        await service.ingress.submit(ops(second), caller=ANONYMOUS, source="api")
        await drain(service)
        async with service.pool.acquire() as pooled:
            assert await pooled.fetchval("SHOW work_mem") == default
    assert await conn.fetchval("SELECT note FROM orders WHERE id = 2") == default


async def test_the_service_functions_are_not_the_caller_roles(settings: Settings) -> None:
    """Of a flushing connection's own functions, the caller role may execute none; the
    ones statements run in are the role's, and only the login may call them."""
    async with running(settings) as service, service.pool.acquire() as pooled:
        rows = await pooled.fetch(
            """SELECT proname, pg_get_userbyid(proowner),
                      has_function_privilege($1, oid, 'EXECUTE')
               FROM pg_proc WHERE pronamespace = pg_my_temp_schema() ORDER BY proname""",
            ROLE,
        )
    names = {r[0] for r in rows}
    assert {"streamsvc_claim", "streamsvc_mark_failed", "streamsvc_apply_batch"} <= names
    assert [r[0] for r in rows if r[2]] == []
    owned = [r[0] for r in rows if r[1] == ROLE]
    assert owned == ["streamsvc_as_caller", "streamsvc_as_caller_each"]


def privileges(statements: list[str]) -> set[str]:
    return {s.split(" TO ")[0] for s in statements if s.startswith("GRANT ") and " ON " in s}


async def test_grants_follow_the_allow_list(conn: asyncpg.Connection) -> None:
    """Granted exactly what the allow-list needs (a serial's sequence included); when the
    list shrinks, what it no longer needs is revoked; a second run changes nothing."""
    await conn.execute("CREATE SCHEMA billing; CREATE TABLE billing.tickets (id serial, t text)")
    role = f"streamsvc_caller_t{uuid.uuid4().hex[:8]}"
    try:
        wide = AllowList.parse("orders, billing.tickets, profiles(id, name)")
        done = await caller_role.sync(conn, role, wide)
        login = await conn.fetchval("SELECT current_user")
        assert done[:2] == [f'CREATE ROLE "{role}" NOLOGIN', f'GRANT "{role}" TO "{login}"']
        assert privileges(done) == {
            "GRANT DELETE ON TABLE billing.tickets",
            "GRANT DELETE ON TABLE public.orders",
            "GRANT DELETE ON TABLE public.profiles",
            "GRANT INSERT ON TABLE billing.tickets",
            "GRANT INSERT ON TABLE public.orders",
            "GRANT INSERT (id) ON TABLE public.profiles",
            "GRANT INSERT (name) ON TABLE public.profiles",
            "GRANT SELECT ON TABLE billing.tickets",
            "GRANT SELECT ON TABLE public.orders",
            "GRANT SELECT (id) ON TABLE public.profiles",
            "GRANT SELECT (name) ON TABLE public.profiles",
            "GRANT UPDATE ON TABLE billing.tickets",
            "GRANT UPDATE ON TABLE public.orders",
            "GRANT UPDATE (id) ON TABLE public.profiles",
            "GRANT UPDATE (name) ON TABLE public.profiles",
            "GRANT USAGE ON SCHEMA billing",
            "GRANT USAGE ON SCHEMA public",
            "GRANT USAGE ON SEQUENCE billing.tickets_id_seq",
        }
        assert await caller_role.sync(conn, role, wide) == []
        await conn.execute(f'GRANT TRUNCATE ON orders TO "{role}"')  # granted by hand
        narrow = AllowList.parse("orders(id, note)")
        done = await caller_role.sync(conn, role, narrow)
        assert f'REVOKE USAGE ON SEQUENCE billing.tickets_id_seq FROM "{role}"' in done
        assert f'REVOKE TRUNCATE ON TABLE public.orders FROM "{role}"' in done
        held = await caller_role.held(conn, role)
        assert held == await caller_role.wanted(conn, narrow)
        assert {(p.kind, p.name) for p in held} == {
            ("TABLE", "public.orders"),
            ("SCHEMA", "public"),
        }
        assert await caller_role.sync(conn, role, narrow) == []
    finally:
        await caller_role.sync(conn, role, AllowList({}))
        await conn.execute(f'DROP ROLE "{role}"')


async def test_a_role_that_could_do_more_is_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(NotMigratedError, match="must be a plain NOLOGIN role, but it is LOGIN"):
        await caller_role.sync(conn, "postgres", AllowList.parse(ALLOWED))


LOGIN = "streamsvc_test_login"  # kept in the cluster; what it owns goes with each database
OWNED = ("orders", "counters", "payments", "profiles")


@pytest.fixture
async def login(conn: asyncpg.Connection) -> str:
    """A login without superuser or CREATEROLE that owns the service's tables and most
    target tables, a member of the caller role (an administrator's two statements)."""
    with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        await conn.execute(f'CREATE ROLE "{LOGIN}" LOGIN')
    await conn.execute(f'GRANT "{ROLE}" TO "{LOGIN}"')
    service_tables = (
        "BatchOperations",
        "streamsvc_migrations",
        "streamsvc_api_keys",
        "streamsvc_schedule_ticks",
        "streamsvc_paused_types",
        "streamsvc_announced",
    )
    for table in (*service_tables, *OWNED):
        await conn.execute(f'ALTER TABLE "{table}" OWNER TO "{LOGIN}"')
    return LOGIN


async def test_a_least_privilege_login_sets_the_role_up_and_applies_as_it(
    database: str, prefix: str, conn: asyncpg.Connection, login: str, unchecked: None
) -> None:
    """Started with an allow-list that dropped payments, the service (its login a plain
    one) revokes what the role no longer needs and applies as the role."""
    allowed = "orders, counters, profiles(id, name)"
    settings = make_settings(database, prefix, DB_USERNAME=login, STREAMSVC_ALLOWED_TABLES=allowed)
    await conn.execute("INSERT INTO counters VALUES ('hits', 0)")
    batch = [
        order(1),
        raw("UPDATE counters SET value = value + $1 WHERE name = $2", 2, "hits"),
        raw("UPDATE counters SET value = (SELECT count(*) FROM payments) WHERE name = 'hits'"),
    ]
    async with running(settings) as service:
        await service.ingress.submit(ops(batch), caller=ANONYMOUS, source="api")
        await drain(service)
    rows = await conn.fetch('SELECT status, error FROM "BatchOperations" ORDER BY created_at')
    assert sorted(r[0] for r in rows) == ["FAIL", "SUCCESS", "SUCCESS"]
    assert [r[1] for r in rows if r[0] == "FAIL"] == ["permission denied for table payments"]
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'hits'") == 2
    held = await caller_role.held(conn, ROLE)
    assert held == await caller_role.wanted(conn, AllowList.parse(allowed))


async def test_a_login_that_may_not_grant_is_told_what_to_run(
    database: str, prefix: str, conn: asyncpg.Connection, login: str
) -> None:
    await conn.execute("CREATE TABLE ledger (id integer PRIMARY KEY)")  # the superuser's
    settings = make_settings(
        database, prefix, DB_USERNAME=login, STREAMSVC_ALLOWED_TABLES=f"{ALLOWED}, ledger"
    )
    with pytest.raises(NotMigratedError) as refused:
        async with running(settings):
            pass
    assert f'GRANT DELETE ON TABLE public.ledger TO "{ROLE}"' in str(refused.value)
    assert "streamsvc caller-role --sql" in str(refused.value)
    assert await caller_role.plan(conn, ROLE, AllowList.parse(f"{ALLOWED}, ledger")) != []
