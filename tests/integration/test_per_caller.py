"""Per-caller data: a key sees only the operations it submitted (an admin key sees all), and
a userOperationId is the idempotency key of one key, not of the whole service."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import anyio
import asyncpg
import httpx
import pytest

from streamsvc.supervisor import Service
from tests.conftest import keyed_settings
from tests.nest import NestClient
from tests.pipeline import eventually, order, served_with_clients, until_applied

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@dataclass
class World:
    service: Service
    db: asyncpg.Connection
    http: httpx.AsyncClient
    rpc: NestClient
    keys: dict[str, str]  # "a", "b": ordinary keys; "admin": an admin key
    events: aio_pika.abc.AbstractQueue  # every ORDER_CREATED outcome event

    async def post(self, who: str, body: Any, path: str = "/api/operations") -> httpx.Response:
        return await self.http.post(path, json=body, headers={"x-api-key": self.keys[who]})

    async def get(self, who: str, ref: str) -> httpx.Response:
        return await self.http.get(f"/api/operations/{ref}", headers={"x-api-key": self.keys[who]})

    async def send(self, who: str, pattern: str, data: Any) -> dict[str, Any]:
        if isinstance(data, dict):
            data = {**data, "apiKey": self.keys[who]}
            reply = await self.rpc.send(pattern, data)
        else:  # a list or a bare id: the key goes in the header
            request_id = str(uuid.uuid4())
            body = json.dumps({"pattern": pattern, "data": data, "id": request_id}).encode()
            await self.rpc.publish(body, request_id, headers={"x-api-key": self.keys[who]})
            reply = await self.rpc.reply(request_id)
        response: dict[str, Any] = reply["response"]
        return response

    async def applied(self, op_id: str) -> None:
        await until_applied(self.db, by="id", value=op_id)


@pytest.fixture
async def world(database: str, prefix: str) -> AsyncIterator[World]:
    settings = keyed_settings(database, prefix)
    async with served_with_clients(settings) as (service, db, http, rpc):
        store = service.keys
        assert store is not None
        keys = {
            name: await store.create(
                db, name, tables=["orders"], actions=["insert"], allow_sql=False, admin=admin
            )
            for name, admin in (("a", False), ("b", False), ("admin", True))
        }
        await store.load(db)
        exchange = await rpc.channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        events = await rpc.channel.declare_queue(exclusive=True)
        await events.bind(exchange, routing_key="ORDER_CREATED.*")
        yield World(service, db, http, rpc, keys, events)


async def test_a_key_sees_only_its_own_operations_over_http(world: World) -> None:
    user_id = str(uuid.uuid4())
    created = await world.post("a", order(1, userOperationId=user_id))
    assert created.status_code == 201
    op_id = created.json()["id"]
    assert op_id != user_id  # stored under the key's own id

    for ref in (op_id, user_id):  # the owner finds it by either id
        mine = await world.get("a", ref)
        assert mine.status_code == 200 and mine.json()["id"] == op_id
        admin = await world.get("admin", ref)
        assert admin.status_code == 200 and admin.json()["id"] == op_id

    unknown = str(uuid.uuid4())
    nothing = await world.get("b", unknown)
    assert nothing.status_code == 404
    for ref in (op_id, user_id):  # not found, exactly as an unknown id: no existence oracle
        other = await world.get("b", ref)
        assert other.status_code == 404
        assert other.headers["content-type"] == nothing.headers["content-type"]
        assert other.text == nothing.text.replace(unknown, ref)
        assert "orders" not in other.text and "ORDER_CREATED" not in other.text


async def test_a_key_sees_only_its_own_operations_over_rpc(world: World) -> None:
    user_id = str(uuid.uuid4())
    created = await world.send("a", "createOperation", order(2, userOperationId=user_id))
    assert created["status"] is True
    op_id = created["data"]["id"]

    for ref in ({"id": op_id}, {"userOperationId": user_id}, {"id": user_id}):
        mine = await world.send("a", "getOperation", ref)
        assert (mine["status"], mine["data"]["id"]) == (True, op_id)
        admin = await world.send("admin", "getOperation", ref)
        assert (admin["status"], admin["data"]["id"]) == (True, op_id)
    assert (await world.send("a", "get_operation", op_id))["data"]["id"] == op_id  # bare id

    unknown = await world.send("b", "getOperation", {"id": str(uuid.uuid4())})
    assert unknown["errorCode"] == "NOT_FOUND"
    for ref in ({"id": op_id}, {"userOperationId": user_id}):
        assert await world.send("b", "getOperation", ref) == unknown
    assert await world.send("b", "get_operation", op_id) == unknown


async def test_the_same_user_operation_id_from_two_keys_is_two_operations(world: World) -> None:
    user_id = str(uuid.uuid4())
    from_a = await world.post("a", order(10, userOperationId=user_id))
    from_b = await world.send("b", "createOperation", order(11, userOperationId=user_id))
    assert from_a.status_code == 201 and from_b["message"] == "Operation created"
    a_id, b_id = from_a.json()["id"], from_b["data"]["id"]
    assert a_id != b_id
    await world.applied(a_id)
    await world.applied(b_id)

    # A's repeat answers A's operation and is not applied again, on either door.
    again = await world.post("a", order(10, userOperationId=user_id))
    assert (again.status_code, again.json()) == (
        200,
        {"id": a_id, "operationType": "ORDER_CREATED", "status": "SUCCESS", "created": False},
    )
    bulk = await world.send("a", "create_operations", [order(10, userOperationId=user_id)])
    assert bulk["data"] == [again.json()]
    # B's bulk repeat shows B's own operation, whatever A's stands at.
    b_bulk = await world.post(
        "b", [order(11, userOperationId=user_id)], path="/api/operations/batch"
    )
    assert [(i["id"], i["created"]) for i in b_bulk.json()] == [(b_id, False)]

    rows = await world.db.fetch("SELECT id FROM orders WHERE id IN (10, 11) ORDER BY id")
    assert [r["id"] for r in rows] == [10, 11]  # each applied once
    who = await world.db.fetch(
        """SELECT submitted_by, id::text FROM "BatchOperations"
        WHERE user_operation_id = $1 ORDER BY submitted_by""",
        user_id,
    )
    assert [tuple(r) for r in who] == [("a", a_id), ("b", b_id)]


async def test_outcome_events_carry_the_callers_user_operation_id(world: World) -> None:
    user_id = str(uuid.uuid4())
    op_id = (await world.post("a", order(20, userOperationId=user_id))).json()["id"]
    await world.applied(op_id)
    with anyio.fail_after(10):
        while True:
            message = await world.events.get(fail=False)
            if message is None:
                await anyio.sleep(0.05)
                continue
            success = json.loads(message.body)["data"]["success"]
            if any(s["id"] == op_id for s in success):
                break
    assert {"id": op_id, "userOperationId": user_id, "meta": None} in success


async def test_a_list_shows_a_key_its_own_operations_newest_first_page_by_page(
    world: World,
) -> None:
    mine = [(await world.post("a", order(n))).json()["id"] for n in range(1, 8)]
    theirs = (await world.post("b", order(100))).json()["id"]
    for op_id in (*mine, theirs):
        await world.applied(op_id)
    key = {"x-api-key": world.keys["a"]}
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await world.http.get("/api/operations", params=params, headers=key)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == mine[::-1], "each of a's once, newest first, none of b's"
    admin = {"x-api-key": world.keys["admin"]}
    everyone = await world.http.get("/api/operations", params={"limit": "50"}, headers=admin)
    assert {item["id"] for item in everyone.json()["items"]} == {*mine, theirs}
    filtered = await world.http.get(
        "/api/operations",
        params={"status": "FAIL", "operationType": "ORDER_CREATED"},
        headers=admin,
    )
    assert filtered.json() == {"items": [], "nextCursor": None}
    over_rpc = await world.send("b", "listOperations", {"status": "SUCCESS"})
    assert [item["id"] for item in over_rpc["data"]["items"]] == [theirs]


async def test_a_list_refuses_a_forged_cursor_or_limit_naming_the_field(world: World) -> None:
    key = {"x-api-key": world.keys["a"]}
    for params, field in (
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ({"limit": "0"}, "limit"),
        ({"status": "DONE"}, "status"),
        ({"operationType": "A\x00B"}, "operationType"),  # PostgreSQL text takes no NUL
        ({"operationType": "x" * 300}, "operationType"),
    ):
        refused = await world.http.get("/api/operations", params=params, headers=key)
        assert refused.status_code == 422, (params, refused.text)
        assert field in refused.text
    over_rpc = await world.send("a", "list_operations", {"cursor": "x"})
    assert over_rpc["status"] is False and over_rpc["errorCode"] == "VALIDATION_ERROR"
    assert over_rpc["error"].startswith("cursor")


LIST_REFUSALS: list[tuple[dict[str, str], str, str]] = [
    ({"status": "DONE"}, "status", ""),
    ({"operationType": "A\x00B"}, "operationType", "control character"),
    ({"operationType": "x" * 300}, "operationType", "longer than"),
    ({"since": "yesterday"}, "since", ""),
    ({"until": "2026-13-01T00:00:00Z"}, "until", ""),
    ({"since": "0001-01-01T00:00:00+05:00"}, "since", "out of range"),
    ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until", "after since"),
    ({"limit": "0"}, "limit", ""),
    ({"limit": "1001"}, "limit", ""),
    ({"limit": "ten"}, "limit", ""),
    ({"cursor": "%%%"}, "cursor", "not a cursor"),
    ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor", "not a cursor"),
]


async def test_every_bad_list_filter_answers_422_naming_it_over_http_and_rpc(world: World) -> None:
    key = {"x-api-key": world.keys["a"]}
    for params, field, reason in LIST_REFUSALS:
        refused = await world.http.get("/api/operations", params=params, headers=key)
        assert refused.status_code == 422, (params, refused.text)
        errors = refused.json()["errors"]
        assert errors[0]["field"] == field and reason in errors[0]["reason"], (params, errors)
        data: dict[str, Any] = dict(params)
        if "limit" in data and data["limit"].isdigit():
            data["limit"] = int(data["limit"])
        over_rpc = await world.send("a", "listOperations", data)
        assert over_rpc["errorCode"] == "VALIDATION_ERROR", (params, over_rpc)
        assert over_rpc["error"].startswith(field) and reason in over_rpc["error"], over_rpc


async def test_a_cursor_cannot_widen_a_keys_list(world: World) -> None:
    for n in range(3):
        for who in ("a", "b"):
            await world.post(who, order(200 + n))
    headers = {who: {"x-api-key": world.keys[who]} for who in ("a", "b", "admin")}
    page = await world.http.get("/api/operations", params={"limit": "1"}, headers=headers["b"])
    cursor = page.json()["nextCursor"]
    for who in ("a", "admin"):  # b's cursor is b's: refused for a's list and for everyone's
        refused = await world.http.get(
            "/api/operations", params={"cursor": cursor}, headers=headers[who]
        )
        assert refused.status_code == 422
        assert refused.json()["errors"] == [
            {"field": "cursor", "reason": "given for another caller's list"}
        ]
    rest = await world.http.get("/api/operations", params={"cursor": cursor}, headers=headers["b"])
    assert len(rest.json()["items"]) == 2


async def test_counts_show_a_key_its_own_operations_and_an_admin_all(world: World) -> None:
    for n, who in enumerate(("a", "a", "b")):
        await world.applied((await world.post(who, order(300 + n))).json()["id"])
    bad = {**order(303), "values": {"id": 303, "customer": "c", "amount": -1}}  # CHECK fails
    failed = (await world.post("a", bad)).json()["id"]
    await eventually(lambda: _status_is(world.db, failed, "FAIL"))
    mine = await world.http.get("/api/operations/counts", headers={"x-api-key": world.keys["a"]})
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["byStatus"] == {
        "UNPROCESSED": 0, "PROCESSING": 0, "SUCCESS": 2, "FAIL": 1, "CANCELLED": 0
    }  # fmt: skip
    assert body["byType"] == {"ORDER_CREATED": {"SUCCESS": 2, "FAIL": 1}}
    everyone = await world.send("admin", "countOperations", {})
    assert everyone["status"] is True and everyone["data"]["byStatus"]["SUCCESS"] == 3
    theirs = await world.send("b", "count_operations", {"since": "2000-01-01T00:00:00Z"})
    assert theirs["status"] is False and theirs["error"].startswith("since: at most 31 days")
    later = {"since": "2099-01-01T00:00:00", "until": "2099-01-02T00:00:00"}  # naive: UTC
    none = await world.http.get(
        "/api/operations/counts", params=later, headers={"x-api-key": world.keys["b"]}
    )
    assert none.json()["byType"] == {} and none.json()["since"] == "2099-01-01T00:00:00Z"
    for params, field in (
        ({"since": "soon"}, "since"),
        ({"until": "2026-01-01T00:00:00Z", "since": "2026-01-02T00:00:00Z"}, "until"),
        ({"until": "0001-01-01T12:00:00Z"}, "until"),
    ):
        refused = await world.http.get(
            "/api/operations/counts", params=params, headers={"x-api-key": world.keys["a"]}
        )
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == field
    anonymous = await world.http.get("/api/operations/counts")
    assert anonymous.status_code == 401


async def _status_is(db: asyncpg.Connection, op_id: str, status: str) -> bool:
    found = await db.fetchval('SELECT status FROM "BatchOperations" WHERE id = $1::uuid', op_id)
    return bool(found == status)
