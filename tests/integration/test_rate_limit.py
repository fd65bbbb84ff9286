"""Fairness: a key over its rate of operations per second is refused at every door with a
clear answer, nothing of the refused request is stored, and another key sending at the same
moment is not slowed at all."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from structlog.testing import capture_logs

from benchmarks.harness import free_port
from streamsvc.adapters import streams as rs
from streamsvc.ratelimit import RateLimiter
from streamsvc.supervisor import Service
from streamsvc.validate import Caller
from tests.conftest import keyed_settings
from tests.nest import NestClient
from tests.pipeline import eventually, order, served_with_clients, until_applied

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SLOW_RATE = 3  # the "slow" key's own --rate
DEFAULT_RATE = 4  # STREAMSVC_RATE_LIMIT_OPS, for keys without a rate of their own


@dataclass
class Door:
    service: Service
    db: asyncpg.Connection
    http: httpx.AsyncClient
    rpc: NestClient
    keys: dict[str, str]

    async def stored_by(self, name: str) -> int:
        return int(
            await self.db.fetchval(
                'SELECT count(*) FROM "BatchOperations" WHERE submitted_by = $1', name
            )
        )

    async def applied(self, user_id: str) -> None:
        await until_applied(self.db, by="user_operation_id", value=user_id)


@pytest.fixture
async def door(database: str, prefix: str) -> AsyncIterator[Door]:
    settings = keyed_settings(
        database,
        prefix,
        STREAMSVC_RATE_LIMIT_OPS=str(DEFAULT_RATE),
    )
    async with served_with_clients(settings) as (service, db, http, rpc):
        store = service.keys
        assert store is not None
        keys = {
            name: await store.create(
                db, name, tables=None, actions=["insert"], allow_sql=False, rate_limit_ops=rate
            )
            for name, rate in (("slow", SLOW_RATE), ("other", 0), ("plain", None))
        }
        await store.load(db)
        yield Door(service, db, http, rpc, keys)


def orders(first: int, n: int) -> list[dict[str, Any]]:
    return [order(i, userOperationId=str(uuid.uuid4())) for i in range(first, first + n)]


async def test_over_its_rate_a_key_gets_429_with_retry_after(door: Door) -> None:
    def as_(name: str) -> dict[str, str]:
        return {"x-api-key": door.keys[name]}

    bulk = await door.http.post("/api/operations/batch", json=orders(1, 3), headers=as_("slow"))
    assert bulk.status_code == 200 and all(i["created"] for i in bulk.json())
    refused = await door.http.post("/api/operations", json=order(4), headers=as_("slow"))
    other_op = order(100, userOperationId=str(uuid.uuid4()))
    other = await door.http.post("/api/operations", json=other_op, headers=as_("other"))

    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    problem = refused.json()
    assert problem["errors"] == [
        {
            "field": "rate",
            "reason": f"key 'slow' may submit {SLOW_RATE} operations per second; "
            f"over the limit, retry in {refused.headers['retry-after']} s",
        }
    ]
    assert other.status_code == 201  # the other key at the same moment: not slowed
    # A bulk that alone holds more than a second allows: no Retry-After, it never fits.
    too_big = await door.http.post(
        "/api/operations/batch", json=orders(10, SLOW_RATE + 1), headers=as_("slow")
    )
    assert too_big.status_code == 429 and "retry-after" not in too_big.headers
    assert "send fewer at a time" in too_big.json()["detail"]
    # A key without a rate of its own has the service default.
    plain = [
        (await door.http.post("/api/operations", json=op, headers=as_("plain"))).status_code
        for op in orders(20, DEFAULT_RATE + 1)
    ]
    assert plain == [201] * DEFAULT_RATE + [429]

    assert await door.stored_by("slow") == SLOW_RATE  # nothing refused was stored
    assert await door.stored_by("plain") == DEFAULT_RATE
    await door.applied(other_op["userOperationId"])
    assert (await door.http.get("/readyz")).status_code == 200
    paths = (await door.http.get("/api/openapi.json")).json()["paths"]
    for path in ("/api/operations", "/api/operations/batch"):
        assert "429" in paths[path]["post"]["responses"], path  # documented


async def test_over_its_rate_a_key_gets_rate_limited_over_rpc(door: Door) -> None:
    def as_(name: str, op: dict[str, Any]) -> dict[str, Any]:
        return {**op, "apiKey": door.keys[name]}

    bulk = await door.rpc.send("create_operations", orders(1, SLOW_RATE))
    assert bulk["response"]["errorCode"] == "UNAUTHORIZED"  # no key: not counted either
    request_id = str(uuid.uuid4())
    body = json.dumps(
        {"pattern": "create_operations", "data": orders(1, SLOW_RATE), "id": request_id}
    ).encode()
    await door.rpc.publish(body, request_id, headers={"x-api-key": door.keys["slow"]})
    assert (await door.rpc.reply(request_id))["response"]["status"] is True
    refused = (await door.rpc.send("createOperation", as_("slow", order(4))))["response"]
    other_op = order(100, userOperationId=str(uuid.uuid4()))
    other = (await door.rpc.send("createOperation", as_("other", other_op)))["response"]

    assert refused["status"] is False
    assert refused["errorCode"] == "RATE_LIMITED"
    assert refused["message"] == "Rate limited"
    assert refused["error"].startswith(
        f"rate: key 'slow' may submit {SLOW_RATE} operations per second; over the limit"
    )
    assert 1 <= refused["data"]["retryAfterS"] <= 2
    assert other["status"] is True
    assert await door.stored_by("slow") == SLOW_RATE
    await door.applied(other_op["userOperationId"])
    still = await door.rpc.send("getOperation", as_("other", {"id": other["data"]["id"]}))
    assert still["response"]["data"]["status"] == "SUCCESS"  # the service still answers


async def test_over_its_rate_a_key_has_its_inbox_entries_rejected(door: Door) -> None:
    redis, names = door.service.streams.redis, door.service.streams.names
    slow = [
        await redis.xadd(names.inbox, {"op": json.dumps(op), "key": door.keys["slow"]})
        for op in orders(1, SLOW_RATE + 2)
    ]
    other_op = order(100, userOperationId=str(uuid.uuid4()))
    await redis.xadd(names.inbox, {"op": json.dumps(other_op), "key": door.keys["other"]})
    await door.service.inbox.run(burst=True)

    rejects = {f[b"entry"]: f[b"reason"].decode() for _, f in await redis.xrange(names.rejects)}
    assert list(rejects) == slow[SLOW_RATE:]  # the first ones fit, the later are refused
    for reason in rejects.values():
        assert reason.startswith(
            f"rate: key 'slow' may submit {SLOW_RATE} operations per second; over the limit"
        )
    assert await door.stored_by("slow") == SLOW_RATE
    assert await redis.xlen(names.inbox) == 0  # every entry acked
    await door.applied(other_op["userOperationId"])
    # The reader goes on: a later entry of the other key is stored too.
    later = order(101, userOperationId=str(uuid.uuid4()))
    await redis.xadd(names.inbox, {"op": json.dumps(later), "key": door.keys["other"]})
    await door.service.inbox.run(burst=True)
    await door.applied(later["userOperationId"])


async def test_the_budget_is_shared_by_every_process(prefix: str) -> None:
    """Two processes' limiters (two clients) count against the same Redis counter."""
    clients = [rs.connect("redis://127.0.0.1:6379/0") for _ in range(2)]
    try:
        one, two = (RateLimiter(c, prefix=prefix, default_ops=0) for c in clients)
        caller = Caller("shared", rate_limit_ops=4)
        assert await one.admit(caller, 3) is None
        refusal = await two.admit(caller, 2)
        assert refusal is not None and refusal.retry_after_s is not None
        assert await two.admit(Caller("unlimited", rate_limit_ops=0), 10_000) is None
    finally:
        for client in clients:
            await client.aclose()


async def test_redis_away_admits_and_says_so() -> None:
    client = rs.connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        limiter = RateLimiter(client, prefix="unused", default_ops=1, timeout_s=2)
        with capture_logs() as logs:
            assert await limiter.admit(Caller("k"), 1) is None
            assert await limiter.admit_some(Caller("k"), 1) == (1, None)
        assert [e["event"] for e in logs] == ["rate.unavailable", "rate.unavailable"]
        assert logs[0]["next"] == "admitted without counting until Redis answers"
    finally:
        await client.aclose()


async def test_retries_count_against_the_key_s_rate(door: Door) -> None:
    """A key retrying its own failing operation as fast as it can is held to its rate like
    any submission: over it, 429 naming the field, and nothing replayed."""
    headers = {"x-api-key": door.keys["slow"]}
    bad = order(1, values={"id": 1, "customer": "c", "amount": -1})
    op_id = (await door.http.post("/api/operations", json=bad, headers=headers)).json()["id"]

    async def failed() -> bool:
        status = await door.db.fetchval(
            'SELECT status FROM "BatchOperations" WHERE id = $1::uuid', op_id
        )
        return bool(status == "FAIL")

    await eventually(failed)
    await anyio.sleep(1.1)  # a fresh second's budget
    answers = [
        await door.http.post(f"/api/operations/{op_id}/retry", headers=headers)
        for _ in range(SLOW_RATE + 1)
    ]
    codes = [a.status_code for a in answers]
    assert codes[0] == 200 and codes[-1] == 429 and 429 not in codes[:-1], codes
    assert answers[-1].json()["errors"][0]["field"] == "rate"
    history = await door.db.fetchval(
        'SELECT jsonb_array_length(history) FROM "BatchOperations" WHERE id = $1::uuid', op_id
    )
    # Each admitted retry replayed it (it fails again at once, so the next one may too);
    # the refused one changed nothing.
    assert history == codes.count(200), (history, codes)
