"""API keys on the inbox path: who may submit, and what."""

from __future__ import annotations

import json

import anyio
import asyncpg
import pytest

from streamsvc.errors import InvalidOperation
from streamsvc.settings import Settings
from tests.conftest import PG, keyed_settings
from tests.pipeline import eventually, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def order(i: int, table: str = "orders") -> bytes:
    return json.dumps(
        {
            "operationType": "ORDER_CREATED",
            "table": table,
            "action": "insert",
            "values": {"id": i, "customer": "c", "amount": 1},
        }
    ).encode()


@pytest.fixture
def settings(database: str, prefix: str) -> Settings:
    return keyed_settings(database, prefix)


async def test_inbox_checks_keys_and_scopes(settings: Settings) -> None:
    conn = await asyncpg.connect(database=settings.db_name, **PG)
    try:
        async with running(settings) as service:
            assert service.keys is not None
            key = await service.keys.create(
                conn, "orders-svc", tables=["orders"], actions=["insert"], allow_sql=False
            )
            await service.keys.load(conn)
            stored = await conn.fetchval("SELECT key_hash FROM streamsvc_api_keys")
            assert key.encode() not in stored and len(stored) == 32  # only the HMAC is kept
            inbox, redis = service.streams.names.inbox, service.streams.redis
            cases = [
                ({"op": order(1), "key": key}, None),
                ({"op": order(2)}, "key: an API key is required"),
                ({"op": order(3), "key": "ssk_wrong"}, "key: unknown or revoked API key"),
                (
                    {"op": order(4, "payments"), "key": key},
                    "table: caller 'orders-svc' may not touch public.payments",
                ),
                (
                    {
                        "op": json.dumps({"operationType": "X", "sql": "DELETE FROM orders"}),
                        "key": key,
                    },
                    "sql: caller 'orders-svc' may not send SQL",
                ),
            ]
            for fields, _ in cases:
                await redis.xadd(inbox, fields)
            await service.inbox.run(burst=True)
            reasons = [
                f[b"reason"].decode() for _, f in await redis.xrange(service.streams.names.rejects)
            ]
            assert reasons == [reason for _, reason in cases if reason]
            who = await conn.fetch('SELECT submitted_by FROM "BatchOperations"')
            assert [r[0] for r in who] == ["orders-svc"]

            assert await service.keys.revoke(conn, "orders-svc")
            service.keys.refresh_s = 0.05
            store = service.keys

            async def refused() -> bool:
                try:
                    store.authenticate(key)
                except InvalidOperation:
                    return True
                return False

            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run, service.pool)  # the periodic reload every process runs
                await eventually(refused, within=5)
                tg.cancel_scope.cancel()
            await redis.xadd(inbox, {"op": order(5), "key": key})
            await service.inbox.run(burst=True)
            last = (await redis.xrevrange(service.streams.names.rejects, count=1))[0][1]
            assert last[b"reason"] == b"key: unknown or revoked API key"
    finally:
        await conn.close()
