"""Hostile input through every door of one live service with auth on.

Each hostile operation is refused naming its field while a good operation of another key,
sent at the same moment, is stored and applied; nothing hostile is stored; afterwards the
service still answers on HTTP, RPC and the inbox. The doors are the last word only because
validation comes first: with it switched off, the group commit still fails no one else."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import anyio
import asyncpg
import httpx
import hypothesis
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from benchmarks.harness import REDIS_URL, RMQ_URL
from streamsvc import validate
from streamsvc.actors.notifier import Notifier
from streamsvc.adapters import streams as rs
from streamsvc.errors import InvalidOperation
from streamsvc.model import (
    Operation,
    Outcome,
    Receipt,
    Rejection,
    Status,
    decode_operation,
    work_encoder,
)
from streamsvc.policy import RetryPolicy
from streamsvc.supervisor import Service, open_service
from streamsvc.validate import ANONYMOUS, Caller
from tests.conftest import PG, keyed_settings, make_settings
from tests.envelopes import envelopes
from tests.nest import NestClient, nest_client
from tests.pipeline import drain, eventually, order, running, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SECRET = "hostile-input-test-secret-0123456789abcdef"
LIMIT = 65_536  # STREAMSVC_MAX_BODY_BYTES of the service under test
ids = itertools.count(1000)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile(**fields: Any) -> bytes:
    return json.dumps(order(next(ids), **fields)).encode()


def spliced(field: str, raw: bytes) -> bytes:
    """An order whose ``field`` holds ``raw`` as it is (json.dumps cannot nest that deep)."""
    return hostile()[:-1] + f', "{field}": '.encode() + raw + b"}"


# (class, operation JSON, refused field, words of the reason)
CASES: list[tuple[str, bytes, str, str]] = [
    (
        "operationType of 150 é (300 bytes)",
        hostile(operationType="é" * 150),
        "operationType",
        "longer than 245 bytes",
    ),
    (
        "NUL in a value",
        hostile(values={"id": 1, "customer": "a\x00", "amount": 1}),
        "values.customer",
        "NUL",
    ),
    ("NUL in a column name", hostile(values={"id": 1, "cus\x00": "a"}), "values", "NUL"),
    ("NUL in meta", hostile(meta={"note": ["\x00"]}), "meta.note", "NUL"),
    ("NUL in a key of meta", hostile(meta={"\x00": 1}), "meta", "NUL"),
    ("NUL in operationType", hostile(operationType="A\x00B"), "operationType", "control"),
    ("NUL in orderingKey", hostile(orderingKey="k\x00"), "orderingKey", "control"),
    ("newline in orderingKey", hostile(orderingKey="k\n"), "orderingKey", "control"),
    (
        "NUL in a statement's params",
        json.dumps(
            {
                "operationType": "RAW",
                "sql": "UPDATE orders SET note = $1 WHERE id = $2",
                "params": ["\x00", 1],
            }
        ).encode(),
        "params.0",
        "NUL",
    ),
    ("runAt near year 9999", hostile(runAt="9999-12-31T23:59:59-14:00"), "runAt", "between"),
    ("runAt in 1970", hostile(runAt="1970-01-01T00:00:00Z"), "runAt", "between"),
    ("huge delayMs", hostile(delayMs=10**20), "delayMs", "<= 31622400000"),
    ("meta nested 2,000 deep", spliced("meta", nested(2_000)), "meta", "nested deeper than 32"),
    ("meta nested 33 deep", spliced("meta", nested(32)), "meta", "nested deeper than 32"),
    (
        "values nested 10,000 deep, unterminated",
        spliced("values", b'{"a": ' * 10_000),
        "values",
        "nested deeper than 32",
    ),
]


@dataclass
class Live:
    service: Service
    hostile: str  # the attacker's key: orders, insert and update, SQL allowed
    good: str  # another caller's key
    conn: asyncpg.Connection

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.service.settings.http_port}"


@pytest.fixture
async def live(database: str, prefix: str) -> AsyncIterator[Live]:
    settings = keyed_settings(
        database,
        prefix,
        STREAMSVC_MAX_BODY_BYTES=str(LIMIT),
        STREAMSVC_NOTIFY_MODE="operation",
    )
    conn = await asyncpg.connect(database=database, **PG)
    try:
        async with serving(settings) as service, anyio.create_task_group() as tg:
            store = service.keys
            assert store is not None
            bad = await store.create(
                conn, "hostile", tables=["orders"], actions=["insert", "update"], allow_sql=True
            )
            good = await store.create(
                conn, "good", tables=["orders"], actions=["insert"], allow_sql=False
            )
            await store.load(conn)
            tg.start_soon(service.inbox.run)
            yield Live(service, bad, good, conn)
            tg.cancel_scope.cancel()
    finally:
        await conn.close()


# -- one operation through one door: (field, reason) when refused, else the receipt ----------
async def via_http(live: Live, key: str, raw: bytes) -> tuple[str, str] | str:
    async with httpx.AsyncClient(base_url=live.base) as c:
        response = await c.post(
            "/api/operations",
            content=raw,
            headers={"x-api-key": key, "content-type": "application/json"},
        )
    if response.status_code in (200, 201):
        return str(response.json()["id"])
    assert response.status_code in (413, 422), response.text
    error = response.json()["errors"][0]
    return error["field"], error["reason"]


async def via_rpc(live: Live, key: str, raw: bytes) -> tuple[str, str] | str:
    async with nest_client(live.service.settings.rmq_queue) as client:
        response = await rpc(client, b'"createOperation"', raw, headers={"x-api-key": key})
    if response.get("status"):
        return str(response["data"]["id"])
    field, _, reason = response["error"].partition(": ")
    return field, reason


async def rpc(
    client: NestClient, pattern: bytes, data: bytes, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A request as NestJS sends it, built from raw JSON; the reply's IResponse (or err)."""
    request_id = str(uuid.uuid4())
    body = b'{"pattern":' + pattern + b',"data":' + data + b',"id":"' + request_id.encode() + b'"}'
    await client.publish(body, request_id, headers=headers)
    reply = await client.reply(request_id)
    assert reply.get("isDisposed") is True, reply
    answer: dict[str, Any] = reply.get("response") or {"status": False, "error": reply["err"]}
    return answer


async def via_inbox(live: Live, key: str, raw: bytes) -> tuple[str, str] | str:
    """The inbox answers nothing: a refusal is found in the rejects stream."""
    redis, names = live.service.streams.redis, live.service.streams.names
    entry = await redis.xadd(names.inbox, {"op": raw, "key": key})
    with anyio.fail_after(10):
        while True:
            for _, reject in await redis.xrange(names.rejects):
                if reject[b"entry"] == entry:
                    assert key.encode() not in b"".join(reject.values()), "rejects keep no key"
                    field, _, reason = reject[b"reason"].decode().partition(": ")
                    return field, reason
            await anyio.sleep(0.02)


Door = Callable[[Live, str, bytes], Awaitable[tuple[str, str] | str]]
DOORS: dict[str, Door] = {"http": via_http, "rpc": via_rpc, "inbox": via_inbox}


async def good_one(live: Live, door: Door) -> str:
    """Another caller's good operation through ``door``, stored; its userOperationId."""
    op_id = str(uuid.uuid4())
    op = order(next(ids), userOperationId=op_id)
    if door is via_inbox:
        redis, names = live.service.streams.redis, live.service.streams.names
        await redis.xadd(names.inbox, {"op": json.dumps(op), "key": live.good})

        async def arrived() -> bool:
            return await stored(live, op_id)

        await eventually(arrived, within=10)
        return op_id
    result = await door(live, live.good, json.dumps(op).encode())
    assert isinstance(result, str), result
    assert await stored(live, op_id)
    return op_id


# Stored ids are the key's own (derived from its name): operations are found by the
# userOperationId their caller gave.
USER_ID = "body->>'userOperationId'"


async def stored(live: Live, user_id: str) -> bool:
    row = await live.conn.fetchval(
        f'SELECT count(*) FROM "BatchOperations" WHERE {USER_ID} = $1', user_id
    )
    return bool(row)


async def still_serving(live: Live) -> list[str]:
    """The service answers on all three doors and /healthz; what it stored."""
    async with httpx.AsyncClient(base_url=live.base) as c:
        assert (await c.get("/healthz")).status_code == 200
    return [await good_one(live, door) for door in DOORS.values()]


async def only_these_stored_and_applied(live: Live, good: list[str]) -> None:
    async def applied() -> bool:
        rows = await live.conn.fetch(f'SELECT {USER_ID}, status FROM "BatchOperations"')
        return {r[0] for r in rows} == set(good) and all(r[1] == "SUCCESS" for r in rows)

    await eventually(applied, within=20)
    applied_orders = await live.conn.fetchval("SELECT count(*) FROM orders")
    assert applied_orders == len(good), "nothing hostile was applied"


@pytest.mark.parametrize("door", list(DOORS))
async def test_every_hostile_operation_is_refused_at_every_door(live: Live, door: str) -> None:
    submit = DOORS[door]
    good: list[str] = []
    for name, raw, field, words in CASES:
        got: dict[str, Any] = {}

        async def attack(raw: bytes = raw, got: dict[str, Any] = got) -> None:
            got["hostile"] = await submit(live, live.hostile, raw)

        async def meanwhile() -> None:
            good.append(await good_one(live, submit))

        async with anyio.create_task_group() as tg:
            tg.start_soon(attack)
            tg.start_soon(meanwhile)
        assert isinstance(got["hostile"], tuple), (name, got["hostile"])
        got_field, reason = got["hostile"]
        assert (got_field, words in reason) == (field, True), (name, got_field, reason)
    good += await still_serving(live)
    await only_these_stored_and_applied(live, good)


# -- the RPC door: messages that fail inside the handler -----------------------------------
async def test_rpc_answers_every_hostile_message_and_serves_the_next(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    explode_on_check(live, monkeypatch)
    good: list[str] = []
    async with nest_client(live.service.settings.rmq_queue) as client:

        async def attacks() -> None:
            order_raw = hostile()
            for header in (NotUtf8(live.hostile), bytearray(b"\xff"), 7, {"nested": "x"}):
                refused = await rpc(
                    client, b'"createOperation"', order_raw, headers={"x-api-key": header}
                )
                assert refused["errorCode"] == "UNAUTHORIZED", header
            deep_pattern = await rpc(client, nested(2_000), b"{}")
            assert "pattern: nested deeper than 32 levels" in deep_pattern["error"]
            deep_ref = await rpc(client, b'"getOperation"', b'{"id": ' + nested(5_000) + b"}")
            assert deep_ref["errorCode"] == "VALIDATION_ERROR"
            assert "nested deeper than 32 levels" in deep_ref["error"]
            too_big = await rpc(client, b'"noSuchPattern"', b'"' + b"x" * LIMIT + b'"')
            assert too_big["error"] == f"body: larger than the {LIMIT} bytes allowed"
            boom = await rpc(
                client,
                b'"create_operations"',
                b"[" + json.dumps(order(next(ids), operationType="EXPLODE")).encode() + b"]",
                headers={"x-api-key": live.hostile},
            )
            assert boom["errorCode"] == "INTERNAL_ERROR"
            for body in (b"\xff\xfe{", b"[" * 50_000, b'{"pattern": "createOperation"'):
                request_id = str(uuid.uuid4())
                await client.publish(body, request_id)
                assert "malformed request" in (await client.reply(request_id))["err"]
            # events are never answered, hostile ones neither, and consuming goes on
            emitted = b'{"pattern": "createOperation", "data": ' + nested(3_000) + b"}"
            await client.channel.default_exchange.publish(
                aio_pika.Message(emitted), routing_key=client.queue
            )

        async def meanwhile() -> None:
            for _ in range(3):
                good.append(await good_one(live, via_rpc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(attacks)
            tg.start_soon(meanwhile)
    good += await still_serving(live)
    await only_these_stored_and_applied(live, good)


class NotUtf8(str):
    """A header value sent as an AMQP long string that is not valid UTF-8."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe" + super().encode(encoding, errors)


def explode_on_check(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation of type EXPLODE makes validation itself fail: a bug's stand-in."""
    check = live.service.ingress.check

    async def exploding(op: Operation, caller: Caller) -> None:
        if op.operation_type == "EXPLODE":
            raise RuntimeError("a bug in validation")
        await check(op, caller)

    monkeypatch.setattr(live.service.ingress, "check", exploding)


# -- the inbox: bad entries read together with good ones -----------------------------------
async def test_inbox_rejects_hostile_entries_and_stores_the_good_ones_read_with_them(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    explode_on_check(live, monkeypatch)
    redis, names = live.service.streams.redis, live.service.streams.names
    good_ids = [str(uuid.uuid4()) for _ in range(3)]
    entries: list[tuple[dict[str, Any], str]] = [
        ({"op": json.dumps(order(next(ids), userOperationId=good_ids[0])), "key": live.good}, ""),
        ({"op": spliced("meta", nested(2_000)), "key": live.hostile}, "meta: nested deeper"),
        ({"op": b"\xff\xfe" + b"[" * 10_000, "key": live.hostile}, "body: "),
        ({"op": b"x" * (LIMIT + 1), "key": live.hostile}, f"larger than the {LIMIT} bytes"),
        ({"nothing": "here", "key": live.hostile}, "op: entry has no `op` field"),
        (
            {"op": json.dumps({**order(next(ids), meta="\x00"), "apiKey": live.hostile})},
            "meta: contains a NUL",
        ),
        ({"op": hostile(), "key": b"\xff" + live.hostile.encode()}, "key: "),
        ({"op": hostile(operationType="EXPLODE"), "key": live.hostile}, "could not be stored"),
        (
            {"op": json.dumps(order(next(ids), userOperationId=good_ids[1])), "key": live.hostile},
            "",
        ),
        ({"op": json.dumps(order(next(ids), userOperationId=good_ids[2])), "key": live.good}, ""),
    ]
    async with redis.pipeline(transaction=True) as pipe:  # one read takes them all
        for fields, _ in entries:
            pipe.xadd(names.inbox, fields)
        entry_ids = await pipe.execute()

    async def all_rejected() -> bool:
        return bool(await redis.xlen(names.rejects) == sum(1 for _, w in entries if w))

    await eventually(all_rejected, within=15)
    rejects = {fields[b"entry"]: fields for _, fields in await redis.xrange(names.rejects)}
    for entry_id, (_, words) in zip(entry_ids, entries, strict=True):
        if words:
            assert words in rejects[entry_id][b"reason"].decode(), (words, rejects[entry_id])
    kept = b"".join(b"".join(fields.values()) for fields in rejects.values())
    assert live.hostile.encode() not in kept and live.good.encode() not in kept
    for op_id in good_ids:

        async def arrived(op_id: str = op_id) -> bool:
            return await stored(live, op_id)

        await eventually(arrived, within=10)
    await only_these_stored_and_applied(live, good_ids + await still_serving(live))


# -- the HTTP door: sizes are checked on the bytes received --------------------------------
async def test_http_refuses_oversized_chunked_bodies_and_deep_bulk_items(live: Live) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"operationType": "T", "meta": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    headers = {"x-api-key": live.hostile, "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=live.base) as c:
        response = await c.post("/api/operations", content=chunks(), headers=headers)
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        assert response.json()["errors"][0]["reason"] == f"larger than the {LIMIT} bytes allowed"
        ok = json.dumps(order(next(ids))).encode()
        bulk = b"[" + ok + b"," + ok + b"," + spliced("meta", nested(40)) + b"]"
        response = await c.post("/api/operations/batch", content=bulk, headers=headers)
        assert response.status_code == 422
        assert response.json()["errors"][0] == {
            "field": "2.meta",
            "reason": "nested deeper than 32 levels",
        }
    await only_these_stored_and_applied(live, await still_serving(live))


# -- the notifier: an outcome RabbitMQ cannot route ----------------------------------------
async def test_an_outcome_rabbitmq_cannot_route_is_dead_lettered_and_the_rest_delivered(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The door keeps operationType short enough for its routing key; one stored before
    (or by another version) whose key is too long still stops nothing."""
    monkeypatch.setattr(validate, "MAX_TYPE_BYTES", 255)
    settings = live.service.settings
    connection = await aio_pika.connect(settings.rmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        events = await channel.declare_queue(exclusive=True)
        await events.bind(exchange, routing_key="#")
        long_type = "x" * 250  # <type>.SUCCESS is 258 bytes
        long_id, normal_id = str(uuid.uuid4()), str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            for op in (
                order(next(ids), operationType=long_type, userOperationId=long_id),
                order(next(ids), userOperationId=normal_id),
            ):
                tg.start_soon(via_http, live, live.good, json.dumps(op).encode())
        redis, names = live.service.streams.redis, live.service.streams.names

        async def dead_lettered() -> bool:
            return bool(await redis.xlen(names.dead) == 1)

        await eventually(dead_lettered, within=20)
        (_, dead), *_ = await redis.xrange(names.dead)
        assert "AMQP allows 255" in dead[b"reason"].decode()
        outcomes = msgspec.json.decode(dead[b"outcomes"])
        assert [o["userOperationId"] for o in outcomes] == [long_id]
        later = await still_serving(live)
        delivered: set[str] = set()

        async def all_delivered() -> bool:
            message = await events.get(fail=False)
            if message is not None:
                delivered.add(json.loads(message.body)["data"]["userOperationId"])
                await message.ack()
            return delivered >= {normal_id, *later}

        await eventually(all_delivered, within=20)
        assert long_id not in delivered
    await only_these_stored_and_applied(live, [long_id, normal_id, *later])


async def test_an_outcome_rabbitmq_refuses_is_dead_lettered_and_the_notifier_goes_on(
    prefix: str,
) -> None:
    """A real per-message refusal: a queue bound to ``FULL.#`` that holds nothing and rejects
    what it cannot hold, so RabbitMQ nacks every event routed to it. And a message above a
    lowered STREAMSVC_AMQP_MAX_MESSAGE_BYTES, dead-lettered without being sent."""
    client = rs.connect(REDIS_URL)
    streams = rs.Streams(client, rs.Names(prefix))
    names = streams.names
    await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
    exchange_name = f"{prefix}-events"
    notifier = Notifier(
        f"{prefix}-notifier",
        streams,
        RetryPolicy(max_attempts=3, base_ms=10, cap_ms=50),
        url=RMQ_URL,
        exchange=exchange_name,
        routes={},
        mode="operation",
        durable_queues=True,
        max_message_bytes=10_000,
    )

    async def add(*outcomes: Outcome) -> None:
        await streams.add(names.outcomes, [{"o": work_encoder.encode(list(outcomes))}])

    def outcome(op_id: str, op_type: str, meta: Any = None) -> Outcome:
        return Outcome(op_id, op_type, Status.SUCCESS, None, 1, "b", meta)

    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        full = await channel.declare_queue(
            f"{prefix}-full",
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        await full.bind(exchange, routing_key="FULL.#")
        seen = await channel.declare_queue(exclusive=True)
        await seen.bind(exchange, routing_key="OK.#")
        delivered: set[str] = set()

        async def delivered_all(*ids: str) -> bool:
            while (message := await seen.get(fail=False)) is not None:
                delivered.add(json.loads(message.body)["data"]["id"])
                await message.ack()
            return delivered >= set(ids)

        async def dead_letters(count: int) -> bool:
            return bool(await client.xlen(names.dead) == count)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(notifier.run)
                await add(outcome("a", "OK"), outcome("b", "FULL"), outcome("c", "OK"))
                await eventually(lambda: dead_letters(1), within=20)
                await eventually(lambda: delivered_all("a", "c"), within=20)
                await add(outcome("d", "OK", meta="m" * 20_000), outcome("e", "OK"))
                await eventually(lambda: dead_letters(2), within=20)
                await eventually(lambda: delivered_all("a", "c", "e"), within=20)
                notifier.stop()
            entries = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]", await client.xrange(names.dead)
            )
            dead = [fields for _, fields in entries]
            assert [msgspec.json.decode(f[b"outcomes"])[0]["id"] for f in dead] == ["b", "d"]
            assert "Basic.Nack" in dead[0][b"reason"].decode()
            assert "(STREAMSVC_AMQP_MAX_MESSAGE_BYTES)" in dead[1][b"reason"].decode()
            assert delivered == {"a", "c", "e"}
            pending = await client.xpending(names.outcomes, rs.NOTIFIER_GROUP)
            assert pending["pending"] == 0, "every entry acked"
        finally:
            await channel.queue_delete(f"{prefix}-full")
            await client.aclose()


# -- the group commit: the last line, should validation let something through ---------------
async def test_a_group_commit_refused_on_its_data_fails_only_the_bad_operations(
    database: str, prefix: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    def op(**fields: Any) -> Operation:
        return msgspec.convert(order(next(ids), **fields), Operation)

    bad = {
        "NUL in meta (jsonb refuses it)": op(meta={"a": "\x00"}),
        "NUL in orderingKey (text refuses it)": op(orderingKey="k\x00"),
        "runAt past year 9999 in UTC": op(runAt="9999-12-31T23:59:59-14:00"),
        "delayMs beyond any date": msgspec.structs.replace(op(), delay_ms=10**20),
    }
    good = [op(userOperationId=str(uuid.uuid4())) for _ in range(6)]
    results: dict[str, Receipt | Rejection] = {}
    async with open_service(make_settings(database, prefix)) as service:

        async def unchecked(op: Operation, caller: Caller) -> None:
            return None  # the door let everything through

        monkeypatch.setattr(service.ingress, "check", unchecked)

        async def submit(name: str, op: Operation) -> None:
            caller = Caller(name=name[:20])  # each its own caller
            (results[name],) = await service.ingress.submit([op], caller=caller, source="test")

        async with anyio.create_task_group() as tg:
            submissions = [*bad.items(), *((f"good {i}", g) for i, g in enumerate(good))]
            for name, one in submissions:
                tg.start_soon(submit, name, one)

            async def all_queued() -> bool:
                return len(service.ingress._queue) == len(submissions)

            await eventually(all_queued, within=5)  # one group: committed together
            committer = anyio.CancelScope()

            async def commit() -> None:
                with committer:
                    await service.ingress.run()

            tg.start_soon(commit)

            async def all_answered() -> bool:
                return len(results) == len(submissions)

            await eventually(all_answered, within=10)
            committer.cancel()
        for name in bad:
            refused = results[name]
            assert isinstance(refused, Rejection), name
            assert refused.field == "body" and refused.reason.startswith("cannot be stored")
        receipts = [results[f"good {i}"] for i in range(len(good))]
        assert all(isinstance(r, Receipt) and r.created for r in receipts)
        await drain(service)
    rows = await conn.fetch(f'SELECT {USER_ID}, status FROM "BatchOperations"')
    assert {r[0]: r[1] for r in rows} == {str(g.user_operation_id): "SUCCESS" for g in good}


# -- property: what the door accepts, PostgreSQL stores ------------------------------------
@pytest.mark.parametrize("validated", [True, False], ids=["validated", "unvalidated"])
async def test_every_decoded_operation_is_stored_or_refused_by_field(
    database: str, prefix: str, conn: asyncpg.Connection, validated: bool
) -> None:
    """Random envelopes through decode and submit, into the real database: each becomes a
    stored operation or a refusal naming a field, never an error. Unvalidated, it is the
    group commit's split that keeps this promise alone."""
    async with running(make_settings(database, prefix)) as service:
        if not validated:

            async def unchecked(op: Operation, caller: Caller) -> None:
                return None

            service.ingress.check = unchecked  # type: ignore[method-assign]

        async def door(raws: list[bytes]) -> None:
            decoded = []
            for raw in raws:
                try:
                    decoded.append(decode_operation(raw))
                except InvalidOperation as refused:
                    assert refused.field and refused.reason
            results = await service.ingress.submit(decoded, caller=ANONYMOUS, source="fuzz")
            for result in results:
                if isinstance(result, Rejection):
                    assert result.field and result.reason
                    continue
                assert await conn.fetchval(
                    'SELECT count(*) FROM "BatchOperations" WHERE id = $1::uuid', result.id
                )

        @hypothesis.settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(envelopes.map(lambda e: json.dumps(e).encode()), max_size=6))
        def holds(raws: list[bytes]) -> None:
            anyio.from_thread.run(door, raws)

        await anyio.to_thread.run_sync(holds)
