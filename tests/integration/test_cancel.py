"""Cancel (docs/scheduling.md, "Cancel"): over HTTP and RPC, announced, racing a flusher."""

from __future__ import annotations

import json
import uuid

import aio_pika
import anyio
import asyncpg
import pytest

from streamsvc.adapters import streams as rs
from streamsvc.model import Receipt, Status, outcomes_decoder
from streamsvc.settings import Settings
from streamsvc.store import Cancelled
from streamsvc.validate import ANONYMOUS
from tests.conftest import keyed_settings, make_settings
from tests.pipeline import (
    Served,
    events_on,
    eventually,
    ops,
    order,
    post_batch,
    running,
    served_with_clients,
)
from tests.pipeline import until_applied as _until_applied

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def until_applied(served: Served, op_id: str) -> None:
    await _until_applied(served.db, by="id", value=op_id)


async def order_ids(db: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await db.fetch("SELECT id FROM orders ORDER BY id")]


async def test_deleting_a_delayed_operation_cancels_it_and_it_is_never_applied(
    served: Served,
) -> None:
    doomed, control = await post_batch(served, order(1, delayMs=1000), order(2, delayMs=1000))
    cancelled = await served.http.delete(f"/api/operations/{doomed}")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["id"], cancelled.json()["status"]) == (doomed, "CANCELLED")
    again = await served.http.delete(f"/api/operations/{doomed}")
    assert (again.status_code, again.json()["status"]) == (200, "CANCELLED")
    await until_applied(served, control)  # its twin's runAt passed and a flusher applied it
    assert await order_ids(served.db) == [2]
    view = (await served.http.get(f"/api/operations/{doomed}")).json()
    assert (view["status"], view["attempts"], view["batchId"]) == ("CANCELLED", 0, None)
    assert view["processedAt"] is not None


async def test_deleting_an_applied_operation_answers_409_naming_its_status(
    served: Served,
) -> None:
    (op_id,) = await post_batch(served, order(1))
    await until_applied(served, op_id)
    refused = await served.http.delete(f"/api/operations/{op_id}")
    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "SUCCESS" in refused.json()["detail"]
    view = (await served.http.get(f"/api/operations/{op_id}")).json()
    assert view["status"] == "SUCCESS"


async def test_deleting_another_keys_operation_or_an_unknown_id_answers_404(
    database: str, prefix: str
) -> None:
    async with served_with_clients(keyed_settings(database, prefix)) as served:
        assert served.service.keys is not None
        keys = {
            name: await served.service.keys.create(
                served.db, name, tables=["orders"], actions=["insert"], allow_sql=False
            )
            for name in ("a", "b")
        }
        await served.service.keys.load(served.db)
        mine = {"x-api-key": keys["a"]}
        theirs = {"x-api-key": keys["b"]}
        created = await served.http.post(
            "/api/operations", json=order(1, delayMs=60_000), headers=mine
        )
        op_id = created.json()["id"]
        for ref in (op_id, str(uuid.uuid4()), "not-a-uuid"):
            response = await served.http.delete(f"/api/operations/{ref}", headers=theirs)
            assert response.status_code == 404, (ref, response.text)
        view = await served.http.get(f"/api/operations/{op_id}", headers=mine)
        assert view.json()["status"] == "UNPROCESSED", "another key's cancel did nothing"
        cancelled = await served.http.delete(f"/api/operations/{op_id}", headers=mine)
        assert (cancelled.status_code, cancelled.json()["status"]) == (200, "CANCELLED")


@pytest.mark.parametrize("pattern", ["cancel_operation", "cancelOperation"])
async def test_rpc_cancel_answers_cancelled_finished_or_not_found(
    served: Served, pattern: str
) -> None:
    pending, applied = await post_batch(served, order(1, delayMs=60_000), order(2))
    await until_applied(served, applied)
    cancelled = (await served.rpc.send(pattern, {"id": pending}))["response"]
    assert (cancelled["status"], cancelled["message"]) == (True, "Operation cancelled")
    assert (cancelled["data"]["id"], cancelled["data"]["status"]) == (pending, "CANCELLED")
    again = (await served.rpc.send(pattern, {"id": pending}))["response"]
    assert (again["status"], again["data"]["status"]) == (True, "CANCELLED")
    finished = (await served.rpc.send(pattern, {"id": applied}))["response"]
    assert (finished["status"], finished["errorCode"]) == (False, "FINISHED")
    assert "SUCCESS" in finished["message"] and finished["data"]["status"] == "SUCCESS"
    unknown = (await served.rpc.send(pattern, {"id": str(uuid.uuid4())}))["response"]
    assert (unknown["status"], unknown["errorCode"], unknown["data"]) == (False, "NOT_FOUND", None)


@pytest.mark.parametrize("mode", ["aggregate", "operation"])
async def test_a_cancel_is_announced_on_the_topic_exchange_as_type_cancelled(
    database: str, prefix: str, mode: str
) -> None:
    settings = make_settings(database, prefix, STREAMSVC_NOTIFY_MODE=mode)
    async with served_with_clients(settings) as served:
        events = await events_on(served, "ORDER_CREATED.CANCELLED")
        (op_id,) = await post_batch(served, order(1, delayMs=60_000))
        assert (await served.http.delete(f"/api/operations/{op_id}")).status_code == 200
        got: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def announced() -> bool:
            message = await events.get(fail=False, no_ack=True)
            if message is not None:
                got.append(message)
            return bool(got)

        await eventually(announced, within=10)
    assert got[0].routing_key == "ORDER_CREATED.CANCELLED"
    body = json.loads(got[0].body)
    data = body["data"]
    if mode == "operation":
        assert (data["id"], data["status"]) == (op_id, "CANCELLED")
    else:  # grouped as the old service's events: not a success
        assert (data["success"], [f["id"] for f in data["failed"]]) == ([], [op_id])


async def test_a_cancel_wins_over_a_flusher_that_already_holds_the_entry(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    async with running(settings) as service:  # committers only: the test is the flusher
        (receipt,) = await service.ingress.submit(ops([order(1)]), caller=ANONYMOUS, source="api")
        assert isinstance(receipt, Receipt)
        names, flusher = service.streams.names, service.flushers[0]
        await service.streams.ensure_group(names.work, rs.FLUSHER_GROUP)
        taken = await service.streams.read(
            names.work, rs.FLUSHER_GROUP, flusher.name, count=10, block_ms=None
        )
        assert len(taken) == 1, "the flusher holds the entry"
        cancelled = await service.ingress.cancel(receipt.id)
        assert cancelled.verdict == "cancelled"
        await flusher.handle([(names.work, entry) for entry in taken])
        outcomes = await service.streams.redis.xrange(names.outcomes)
        assert await service.streams.length(names.work) == 0, "acked all the same"
    assert await order_ids(conn) == []
    row = await conn.fetchrow('SELECT status, attempts FROM "BatchOperations"')
    assert (row["status"], row["attempts"]) == ("CANCELLED", 0)
    reported = [o for _, f in outcomes for o in outcomes_decoder.decode(f[b"o"])]
    assert [(o.id, o.status) for o in reported] == [(receipt.id, Status.CANCELLED)]


async def test_cancels_racing_a_flusher_either_win_or_answer_finished(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    # Entries of 4 operations, applied one after the other: the cancels land among them.
    settings = make_settings(database, prefix, BATCH_PROCESS_OPERATION_LIMIT="4")
    async with running(settings) as service:
        receipts = await service.ingress.submit(
            ops([order(i) for i in range(40)]), caller=ANONYMOUS, source="api"
        )
        ids = [r.id for r in receipts if isinstance(r, Receipt)]
        names, flusher = service.streams.names, service.flushers[0]
        await service.streams.ensure_group(names.work, rs.FLUSHER_GROUP)
        taken = await service.streams.read(
            names.work, rs.FLUSHER_GROUP, flusher.name, count=100, block_ms=None
        )
        verdicts: dict[str, Cancelled] = {}

        async def cancel(op_id: str) -> None:
            verdicts[op_id] = await service.ingress.cancel(op_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flusher.handle, [(names.work, entry) for entry in taken])
            for op_id in ids:
                tg.start_soon(cancel, op_id)
    rows = await conn.fetch('SELECT id::text, status, body FROM "BatchOperations"')
    applied = set(await order_ids(conn))
    for op_id, status, body in rows:
        verdict = verdicts[op_id].verdict
        landed = json.loads(body)["values"]["id"] in applied
        assert (verdict, status, landed) in {
            ("cancelled", "CANCELLED", False),
            ("finished", "SUCCESS", True),
        }, op_id
    assert any(v.verdict == "cancelled" for v in verdicts.values()), "no cancel came in time"


async def test_cancelling_a_keys_head_releases_the_next_operation(served: Served) -> None:
    head, second, third = await post_batch(
        served,
        order(1, orderingKey="k", delayMs=60_000),  # holds its key for a minute
        order(2, orderingKey="k"),
        order(3, orderingKey="k"),
    )
    assert (await served.http.get(f"/api/operations/{second}")).json()["status"] == "UNPROCESSED"
    assert (await served.http.delete(f"/api/operations/{head}")).status_code == 200
    await until_applied(served, third)
    assert await order_ids(served.db) == [2, 3]
    processed = dict(
        await served.db.fetch(
            'SELECT id::text, processed_at FROM "BatchOperations" WHERE id = ANY($1::uuid[])',
            [second, third],
        )
    )
    assert processed[second] < processed[third]
