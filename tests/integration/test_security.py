"""Every refusal the security contract lists, on all three ingress paths.

Each is refused with an error naming the field, nothing of it is stored, and the service
goes on serving."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from streamsvc.supervisor import Service
from tests.conftest import PG, keyed_settings
from tests.nest import nest_client
from tests.pipeline import eventually, order, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TEN_MB = "x" * 10_000_000


def sql(text: str) -> dict[str, Any]:
    return {"operationType": "RAW", "sql": text, "params": []}


# (name, which key, operation, refused field, words of the reason)
CASES: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("no key", "none", order(1), "key", ""),
    ("wrong key", "wrong", order(2), "key", ""),
    ("revoked key", "revoked", order(3), "key", ""),
    (
        "table outside the key's scope",
        "scoped",
        {**order(4), "table": "payments"},
        "table",
        "may not touch public.payments",
    ),
    (
        "column outside the allow-list",
        "admin",
        {**order(5), "table": "profiles", "values": {"id": 5, "password_hash": "x"}},
        "values.password_hash",
        "column not allowed",
    ),
    (
        "action outside the key's scope",
        "scoped",
        {**order(6), "action": "delete", "values": None, "key": {"id": 6}},
        "action",
        "may not delete",
    ),
    (
        "SQL without --allow-sql",
        "scoped",
        sql("DELETE FROM orders WHERE id = 1"),
        "sql",
        "may not send SQL",
    ),
    (
        "two statements",
        "admin",
        sql("DELETE FROM orders; DELETE FROM payments"),
        "sql",
        "exactly one statement",
    ),
    ("COMMIT", "admin", sql("COMMIT"), "sql", "got COMMIT"),
    ("ROLLBACK", "admin", sql("ROLLBACK"), "sql", "got ROLLBACK"),
    ("DDL", "admin", sql("DROP TABLE orders"), "sql", "got DROP"),
    ("SELECT INTO", "admin", sql("SELECT * INTO stolen FROM orders"), "sql", "SELECT"),
    ("quoted table name", "admin", {**order(7), "table": 'or"ders'}, "table", "not an allowed"),
    (
        "schema not allowed",
        "admin",
        {**order(8), "table": "other.orders"},
        "table",
        "not an allowed",
    ),
    ("10 MB body", "admin", {**order(9), "meta": TEN_MB}, "", "larger than"),
]

Submit = Callable[[str | None, dict[str, Any]], Awaitable[tuple[str, str]]]


@pytest.fixture
async def secured(database: str, prefix: str) -> AsyncIterator[tuple[Service, dict[str, str]]]:
    settings = keyed_settings(database, prefix)
    conn = await asyncpg.connect(database=database, **PG)
    try:
        async with serving(settings) as service:
            store = service.keys
            assert store is not None
            keys = {
                "scoped": await store.create(
                    conn, "scoped", tables=["orders"], actions=["insert"], allow_sql=False
                ),
                "admin": await store.create(
                    conn,
                    "admin",
                    tables=None,
                    actions=["insert", "update", "delete", "upsert"],
                    allow_sql=True,
                ),
                "revoked": await store.create(
                    conn, "gone", tables=None, actions=["insert"], allow_sql=False
                ),
                "wrong": "ssk_" + "0" * 43,
            }
            await store.revoke(conn, "gone")
            await store.load(conn)
            yield service, keys
    finally:
        await conn.close()


async def via_http(service: Service, key: str | None, op: dict[str, Any]) -> tuple[str, str]:
    headers = {"x-api-key": key} if key else {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.settings.http_port}") as c:
        response = await c.post("/api/operations", json=op, headers=headers)
    assert response.status_code in (401, 413, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    error = response.json()["errors"][0]
    return error["field"], error["reason"]


async def rpc_create(service: Service, key: str | None, op: dict[str, Any]) -> dict[str, Any]:
    """createOperation as a NestJS caller sends it; the IResponse it gets."""
    async with nest_client(service.settings.rmq_queue) as client:
        body = {**op, "apiKey": key} if key else op
        response: dict[str, Any] = (await client.send("createOperation", body))["response"]
    return response


async def via_rpc(service: Service, key: str | None, op: dict[str, Any]) -> tuple[str, str]:
    response = await rpc_create(service, key, op)
    assert response["status"] is False
    field, _, reason = response["error"].partition(": ")
    return field, reason


async def via_inbox(service: Service, key: str | None, op: dict[str, Any]) -> tuple[str, str]:
    redis, names = service.streams.redis, service.streams.names
    fields = {"op": json.dumps(op), **({"key": key} if key else {})}
    entry = await redis.xadd(names.inbox, fields)
    with anyio.fail_after(10):
        while True:
            for _, reject in await redis.xrange(names.rejects):
                if reject[b"entry"] == entry:
                    field, _, reason = reject[b"reason"].decode().partition(": ")
                    return field, reason
            await anyio.sleep(0.02)


PATHS = {"http": via_http, "rpc": via_rpc, "inbox": via_inbox}


@pytest.mark.parametrize("path", list(PATHS))
async def test_every_refusal_on_every_path(
    secured: tuple[Service, dict[str, str]], path: str
) -> None:
    service, keys = secured
    submit = PATHS[path]
    async with anyio.create_task_group() as tg:
        if path == "inbox":
            tg.start_soon(service.inbox.run)
        for name, which, op, field, words in CASES:
            got_field, reason = await submit(service, keys.get(which), op)
            expected = field or {"http": "body", "rpc": "body", "inbox": "op"}[path]
            assert got_field == expected, (name, got_field, reason)
            assert words in reason, (name, reason)
        accepted = await _accepted(service, keys["admin"], path)
        service.inbox.stopping = True
    conn = await asyncpg.connect(database=service.settings.db_name, **PG)
    try:
        stored = await conn.fetch('SELECT user_operation_id::text FROM "BatchOperations"')
    finally:
        await conn.close()
    assert [r[0] for r in stored] == [accepted], "nothing refused was stored"


async def _accepted(service: Service, key: str, path: str) -> str:
    """A good operation still goes through on the same path afterwards."""
    op_id = str(uuid.uuid4())
    op = order(100, userOperationId=op_id)
    if path == "http":
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{service.settings.http_port}"
        ) as c:
            response = await c.post("/api/operations", json=op, headers={"x-api-key": key})
            assert response.status_code == 201
    elif path == "rpc":
        assert (await rpc_create(service, key, op))["status"] is True
    else:
        await service.streams.redis.xadd(
            service.streams.names.inbox, {"op": json.dumps(op), "key": key}
        )

        async def stored() -> bool:
            return await service.ingress.get(op_id) is not None

        await eventually(stored, within=10)
    return op_id
