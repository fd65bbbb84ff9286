"""A key's SQL stays inside its scope, through the live service with auth on.

The attacker holds a key created with ``tables=orders, actions=insert, allow_sql``. Each
attack is refused at the door with an error naming ``sql``, nothing of it is stored or
applied, and a good operation another key sends at the same moment lands.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from streamsvc.sqlguard import MAX_SQL_BYTES
from streamsvc.sqlscope import MAX_SQL_DEPTH
from streamsvc.supervisor import Service
from tests.conftest import PG, keyed_settings
from tests.integration.test_security import via_inbox
from tests.nest import nest_client
from tests.pipeline import eventually, order, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

INSERT = "INSERT INTO orders (id, customer, amount)"
# (what is tried, the statement, words of the refusal)
ATTACKS: list[tuple[str, str, str]] = [
    (
        "INSERT ... SELECT from another table",
        f"{INSERT} SELECT id, password_hash, 1 FROM profiles",
        "table public.profiles is outside the caller's scope",
    ),
    (
        "scalar sub-select in VALUES",
        f"{INSERT} VALUES (1, (SELECT secret FROM secrets LIMIT 1), 1)",
        'table "secrets" is not allowed',
    ),
    (
        "sub-select in ON CONFLICT",
        f"{INSERT} VALUES (1, 'c', 1) ON CONFLICT (id) DO UPDATE "
        "SET customer = (SELECT secret FROM secrets LIMIT 1)",
        'table "secrets" is not allowed',
    ),
    (
        "sub-select in WHERE",
        "DELETE FROM orders WHERE id = (SELECT order_id FROM payments LIMIT 1)",
        "table public.payments is outside the caller's scope",
    ),
    ("TABLE", f"{INSERT} TABLE payments", "table public.payments is outside"),
    (
        "RETURNING a sub-select",
        f"{INSERT} VALUES (2, 'c', 1) RETURNING (SELECT secret FROM secrets LIMIT 1)",
        "RETURNING is not allowed",
    ),
    (
        "DELETE ... USING",
        "DELETE FROM orders USING payments p WHERE p.order_id = orders.id",
        "table public.payments is outside",
    ),
    (
        "error-based read",
        f"{INSERT} VALUES ((SELECT secret FROM secrets LIMIT 1)::numeric, 'c', 1)",
        'table "secrets" is not allowed',
    ),
    (
        "ts_stat runs SQL text",
        f"{INSERT} VALUES (3, ts_stat('SELECT to_tsvector(secret) FROM secrets')::text, 1)",
        "function ts_stat is not allowed",
    ),
    (
        "ts_rewrite runs SQL text",
        f"{INSERT} VALUES (3, ts_rewrite('a'::tsquery, 'SELECT 1')::text, 1)",
        "function ts_rewrite is not allowed",
    ),
    (
        "pg_read_file",
        f"{INSERT} VALUES (3, pg_read_file('/etc/passwd'), 1)",
        "function pg_read_file",
    ),
    (
        "current_setting",
        f"{INSERT} VALUES (3, current_setting('data_directory'), 1)",
        "function current_setting",
    ),
    (
        "set_config",
        f"{INSERT} VALUES (3, set_config('statement_timeout', '1', false), 1)",
        "function set_config",
    ),
    (
        "pg_advisory_lock",
        f"{INSERT} SELECT 3, 'c', 1 WHERE pg_advisory_lock(1) IS NOT NULL",
        "function pg_advisory_lock",
    ),
    ("nextval", f"{INSERT} VALUES (nextval('attack_seq'), 'c', 1)", "function nextval"),
    ("setval", f"{INSERT} VALUES (setval('attack_seq', 99), 'c', 1)", "function setval"),
    (
        "replication slots",
        f"{INSERT} SELECT 3, slot_name, 1 FROM pg_replication_slots",
        'table "pg_replication_slots" is not allowed',
    ),
    (
        "the service's own functions",
        f"{INSERT} VALUES (3, pg_temp.streamsvc_apply_rows('x', '[]')::text, 1)",
        "function pg_temp.streamsvc_apply_rows is not allowed",
    ),
    (
        "an operator in pg_temp",
        f"{INSERT} VALUES (3 OPERATOR(pg_temp.+) 1, 'c', 1)",
        "operator pg_temp.+",
    ),
    (
        "ON CONFLICT DO UPDATE by an insert-only key",
        f"{INSERT} VALUES (1000000, 'pwned', 1) ON CONFLICT (id) DO UPDATE SET customer = 'pwned'",
        "may not upsert",
    ),
    (
        "an allowed table outside the key's scope",
        "INSERT INTO payments (id, order_id, amount) VALUES (7, 1, 1)",
        "table public.payments is outside the caller's scope",
    ),
    (
        "a 25,000-term expression",
        f"{INSERT} VALUES (" + "+".join(["1"] * 25_000) + ", 'c', 1)",
        f"longer than {MAX_SQL_BYTES} bytes",
    ),
    (
        "a 3,000-term expression",
        f"{INSERT} VALUES (" + "+".join(["1"] * 3_000) + ", 'c', 1)",
        f"nests more than {MAX_SQL_DEPTH} levels",
    ),
]
# A key that may read profiles, but profiles allows only id and name.
COLUMN_ATTACKS: list[tuple[str, str, str]] = [
    (
        "a column outside the allow-list",
        f"{INSERT} SELECT id, password_hash, 1 FROM profiles",
        'column "password_hash" is not allowed on profiles',
    ),
    (
        "a whole-row reference",
        f"{INSERT} SELECT id, p::text, 1 FROM profiles p",
        "the whole row of p",
    ),
    ("TABLE of a restricted table", f"{INSERT} TABLE profiles", "* would read every column"),
]

SEED = """
INSERT INTO orders (id, customer, amount) VALUES (1000000, 'seed', 1);
INSERT INTO payments (id, order_id, amount) VALUES (1, 1000000, 5);
INSERT INTO profiles (id, name, password_hash) VALUES (1, 'alice', 'hash-of-alice');
INSERT INTO secrets (id, secret) VALUES (1, 's3cret');
CREATE SEQUENCE attack_seq;
"""


@pytest.fixture
async def keyed(database: str, prefix: str) -> AsyncIterator[tuple[Service, dict[str, str]]]:
    settings = keyed_settings(database, prefix)
    conn = await asyncpg.connect(database=database, **PG)
    try:
        await conn.execute(SEED)
        async with serving(settings) as service:
            store = service.keys
            assert store is not None
            keys = {
                "attacker": await store.create(
                    conn, "attacker", tables=["orders"], actions=["insert"], allow_sql=True
                ),
                "reader": await store.create(
                    conn,
                    "reader",
                    tables=["orders", "profiles"],
                    actions=["insert"],
                    allow_sql=True,
                ),
                "other": await store.create(
                    conn, "other", tables=None, actions=["insert"], allow_sql=False
                ),
            }
            await store.load(conn)
            yield service, keys
    finally:
        await conn.close()


async def via_http(service: Service, key: str, op: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.settings.http_port}") as c:
        response = await c.post("/api/operations", json=op, headers={"x-api-key": key})
    return response.status_code, response.json()


async def refused_over_http(service: Service, key: str, sql: str) -> tuple[str, str]:
    status, body = await via_http(service, key, {"operationType": "ATTACK", "sql": sql})
    assert status == 422, body
    error = body["errors"][0]
    return error["field"], error["reason"]


async def refused_over_rpc(service: Service, key: str, sql: str) -> tuple[str, str]:
    async with nest_client(service.settings.rmq_queue) as client:
        reply = await client.send(
            "createOperation", {"operationType": "ATTACK", "sql": sql, "apiKey": key}
        )
    response = reply["response"]
    assert response["status"] is False, response
    field, _, reason = response["error"].partition(": ")
    return field, reason


async def accepted(service: Service, key: str, door: str, op: dict[str, Any]) -> None:
    """``op`` goes in through ``door``: answered as stored (the inbox answers nothing)."""
    if door == "http":
        status, body = await via_http(service, key, op)
        assert status == 201, body
    elif door == "rpc":
        async with nest_client(service.settings.rmq_queue) as client:
            reply = await client.send("createOperation", {**op, "apiKey": key})
        assert reply["response"]["status"] is True, reply
    else:
        names = service.streams.names
        await service.streams.redis.xadd(names.inbox, {"op": json.dumps(op), "key": key})


async def refused_over_inbox(service: Service, key: str, sql: str) -> tuple[str, str]:
    return await via_inbox(service, key, {"operationType": "ATTACK", "sql": sql})


REFUSED = {"http": refused_over_http, "rpc": refused_over_rpc, "inbox": refused_over_inbox}


@pytest.mark.parametrize("path", list(REFUSED))
async def test_sql_outside_the_key_scope_is_refused_at_the_door(
    keyed: tuple[Service, dict[str, str]], path: str
) -> None:
    service, keys = keyed
    async with anyio.create_task_group() as inbox:
        inbox.start_soon(service.inbox.run)
        await attack_all(service, keys, REFUSED[path])
        service.inbox.stopping = True


async def attack_all(
    service: Service, keys: dict[str, str], refused: Callable[..., Awaitable[tuple[str, str]]]
) -> None:
    cases = [("attacker", *case) for case in ATTACKS] + [
        ("reader", *case) for case in COLUMN_ATTACKS
    ]
    good_ids: list[str] = []

    async def good(i: int) -> None:
        status, body = await via_http(service, keys["other"], order(i))
        assert status == 201, body
        good_ids.append(body["id"])

    for i, (who, name, sql, words) in enumerate(cases):
        outcome: list[tuple[str, str]] = []

        async def attack(
            who: str = who, sql: str = sql, outcome: list[tuple[str, str]] = outcome
        ) -> None:
            outcome.append(await refused(service, keys[who], sql))

        async with anyio.create_task_group() as tg:  # the good one at the same moment
            tg.start_soon(attack)
            tg.start_soon(good, i + 1)
        field, reason = outcome[0]
        assert field == "sql", (name, field, reason)
        assert words in reason, (name, reason)

    conn = await asyncpg.connect(database=service.settings.db_name, **PG)
    try:

        async def all_applied() -> bool:
            done = await conn.fetchval(
                "SELECT count(*) FROM \"BatchOperations\" WHERE status = 'SUCCESS'"
            )
            return bool(done == len(cases))

        await eventually(all_applied, within=30)
        stored = await conn.fetch('SELECT id::text FROM "BatchOperations"')
        assert sorted(r["id"] for r in stored) == sorted(good_ids), "no attack was stored"
        # Afterwards the service still takes the other key's operations on every door.
        for n, door in enumerate(REFUSED, start=len(cases) + 1):
            await accepted(service, keys["other"], door, order(n))

        async def all_landed() -> bool:
            done = await conn.fetchval("SELECT count(*) FROM orders")
            return bool(done == len(cases) + len(REFUSED) + 1)

        await eventually(all_landed, within=30)
        orders = await conn.fetch("SELECT id, customer FROM orders ORDER BY id")
        expected = [(i, "c") for i in range(1, len(cases) + 4)] + [(1000000, "seed")]
        assert [tuple(r) for r in orders] == expected
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1
        assert await conn.fetchval("SELECT last_value FROM attack_seq") == 1
        assert await conn.fetchval("SELECT is_called FROM attack_seq") is False
        held = await conn.fetchval(  # the lock pg_advisory_lock(1) would take, in this database
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database() "
            "AND l.classid = 0 AND l.objid = 1 AND l.objsubid = 1"
        )
        assert held == 0
    finally:
        await conn.close()
