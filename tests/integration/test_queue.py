"""Queue management (docs/queue.md): retry and replay under the same id, at most once;
pause and resume an operationType; over HTTP, RPC and the Python API, on the real servers."""

from __future__ import annotations

import datetime as dt
import uuid

import anyio
import asyncpg
import pytest

from benchmarks.harness import PG
from streamsvc.store import Selection
from streamsvc.store.records import HISTORY_KEPT
from tests.conftest import keyed_settings
from tests.pipeline import Served, eventually, order, post_batch, served_with_clients

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DROP_CHECK = "ALTER TABLE orders DROP CONSTRAINT orders_amount_check"


async def until_status(db: asyncpg.Connection, ids: list[str], status: str) -> None:
    async def reached() -> bool:
        count = await db.fetchval(
            'SELECT count(*) FROM "BatchOperations" WHERE id = ANY($1::uuid[]) AND status = $2',
            ids,
            status,
        )
        return bool(count == len(ids))

    await eventually(reached, within=20)


async def failed(served: Served, *numbers: int) -> list[str]:
    """Orders the CHECK constraint refuses (a negative amount): they end FAIL."""
    ids = await post_batch(
        served, *(order(n, values={"id": n, "customer": "c", "amount": -1}) for n in numbers)
    )
    await until_status(served.db, ids, "FAIL")
    return ids


# -- retry one ---------------------------------------------------------------------------------
async def test_a_retried_failure_keeps_its_id_attempts_and_history_and_lands_once(
    served: Served,
) -> None:
    (op_id,) = await failed(served, 1)
    before = (await served.http.get(f"/api/operations/{op_id}")).json()
    await served.db.execute(DROP_CHECK)  # the cause is mended
    retried = await served.http.post(f"/api/operations/{op_id}/retry")
    assert retried.status_code == 200, retried.text
    assert (retried.json()["id"], retried.json()["status"]) == (op_id, "UNPROCESSED")
    await until_status(served.db, [op_id], "SUCCESS")
    view = (await served.http.get(f"/api/operations/{op_id}")).json()
    assert view["attempts"] == 2, "attempts keep counting across a replay"
    assert view["error"] is None
    (ending,) = view["history"]
    assert ending["status"] == "FAIL" and "orders_amount_check" in ending["error"]
    assert (ending["attempts"], ending["batchId"], ending["endedAt"]) == (
        1,
        before["batchId"],
        before["processedAt"],
    )
    assert await served.db.fetchval("SELECT count(*) FROM orders WHERE id = 1") == 1
    again = await served.http.post(f"/api/operations/{op_id}/retry")
    assert again.status_code == 409, again.text
    assert "never applied twice" in again.json()["detail"]


async def test_retry_answers_404_409_and_refuses_what_it_cannot_retry(served: Served) -> None:
    (pending,) = await post_batch(served, order(1, delayMs=60_000))
    not_finished = await served.http.post(f"/api/operations/{pending}/retry")
    assert not_finished.status_code == 409
    assert "UNPROCESSED" in not_finished.json()["detail"]
    for ref in (str(uuid.uuid4()), "not-a-uuid"):
        unknown = await served.http.post(f"/api/operations/{ref}/retry")
        assert unknown.status_code == 404, unknown.text


async def test_a_cancelled_operation_is_retried_and_applied(served: Served) -> None:
    (op_id,) = await post_batch(served, order(1, delayMs=60_000))
    assert (await served.http.delete(f"/api/operations/{op_id}")).status_code == 200
    await served.db.execute(
        'UPDATE "BatchOperations" SET run_at = NULL WHERE id = $1::uuid', op_id
    )  # its runAt moved to now, so the retry applies it at once
    retried = await served.http.post(f"/api/operations/{op_id}/retry")
    assert retried.status_code == 200, retried.text
    await until_status(served.db, [op_id], "SUCCESS")
    view = (await served.http.get(f"/api/operations/{op_id}")).json()
    assert [h["status"] for h in view["history"]] == ["CANCELLED"]
    assert view["attempts"] == 1


async def test_many_racing_retries_apply_an_operation_once(served: Served) -> None:
    (op_id,) = await failed(served, 1)
    await served.db.execute(DROP_CHECK)
    answers: list[int] = []

    async def retry() -> None:
        answers.append((await served.http.post(f"/api/operations/{op_id}/retry")).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(retry)
    assert answers.count(200) == 1, answers
    assert set(answers) <= {200, 409}
    await until_status(served.db, [op_id], "SUCCESS")
    await anyio.sleep(0.5)  # any second application would land by now
    assert await served.db.fetchval("SELECT count(*) FROM orders WHERE id = 1") == 1
    view = (await served.http.get(f"/api/operations/{op_id}")).json()
    assert (view["attempts"], len(view["history"])) == (2, 1)


@pytest.mark.parametrize("pattern", ["retry_operation", "retryOperation"])
async def test_rpc_retry_answers_replayed_succeeded_or_not_found(
    served: Served, pattern: str
) -> None:
    (op_id,) = await failed(served, 1)
    await served.db.execute(DROP_CHECK)
    replayed = (await served.rpc.send(pattern, {"id": op_id}))["response"]
    assert (replayed["status"], replayed["message"]) == (True, "Operation replayed")
    assert replayed["data"]["id"] == op_id
    await until_status(served.db, [op_id], "SUCCESS")
    succeeded = (await served.rpc.send(pattern, op_id))["response"]
    assert (succeeded["status"], succeeded["errorCode"]) == (False, "SUCCEEDED")
    unknown = (await served.rpc.send(pattern, {"id": str(uuid.uuid4())}))["response"]
    assert (unknown["status"], unknown["errorCode"]) == (False, "NOT_FOUND")
    nameless = (await served.rpc.send(pattern, {}))["response"]
    assert (nameless["status"], nameless["errorCode"]) == (False, "VALIDATION_ERROR")


async def test_a_key_retries_only_its_own_operations(database: str, prefix: str) -> None:
    async with served_with_clients(keyed_settings(database, prefix)) as served:
        keys = served.service.keys
        assert keys is not None
        made = {
            name: await keys.create(
                served.db, name, tables=["orders"], actions=["insert"], allow_sql=False
            )
            for name in ("a", "b")
        }
        await keys.load(served.db)
        mine, theirs = ({"x-api-key": made[n]} for n in ("a", "b"))
        bad = order(1, values={"id": 1, "customer": "c", "amount": -1})
        op_id = (await served.http.post("/api/operations", json=bad, headers=mine)).json()["id"]
        await until_status(served.db, [op_id], "FAIL")
        other = await served.http.post(f"/api/operations/{op_id}/retry", headers=theirs)
        assert other.status_code == 404, other.text
        view = await served.http.get(f"/api/operations/{op_id}", headers=mine)
        assert (view.json()["status"], view.json()["history"]) == ("FAIL", [])
        own = await served.http.post(f"/api/operations/{op_id}/retry", headers=mine)
        assert own.status_code == 200, own.text


# -- replay many -------------------------------------------------------------------------------
async def test_replay_by_type_and_time_counts_first_then_replays_only_those(
    served: Served,
) -> None:
    orders = await failed(served, 1, 2, 3)
    payment = {
        "operationType": "PAYMENT",
        "table": "payments",
        "action": "insert",
        "values": {"id": 1, "order_id": 1, "amount": 1, "paid_at": "not a time"},
    }
    (other,) = await post_batch(served, payment)
    await until_status(served.db, [other], "FAIL")
    manage = served.service.ingress.manage
    by_type = Selection(operation_type="ORDER_CREATED")
    assert await manage.replay(by_type, dry_run=True) == 3
    future = Selection(since=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert await manage.replay(future, dry_run=True) == 0
    assert await manage.replay(Selection(), ids=[orders[0], other], dry_run=True) == 2
    assert await manage.replay(by_type, ids=[orders[0], other], dry_run=True) == 1
    states = await served.db.fetch('SELECT status FROM "BatchOperations"')
    assert {r["status"] for r in states} == {"FAIL"}, "a dry run changes nothing"
    await served.db.execute(DROP_CHECK)
    assert await manage.replay(by_type) == 3
    await until_status(served.db, orders, "SUCCESS")
    assert (
        await served.db.fetchval('SELECT status FROM "BatchOperations" WHERE id = $1::uuid', other)
        == "FAIL"
    )
    assert await manage.replay(by_type) == 0, "nothing left to replay"
    assert await served.db.fetchval("SELECT count(*) FROM orders") == 3


async def test_a_replay_of_operations_that_fail_again_ends(served: Served) -> None:
    ids = await failed(served, *range(1, 31))
    manage = served.service.ingress.manage
    assert await manage.replay(Selection()) == 30  # they fail again: not taken twice
    await until_status(served.db, ids, "FAIL")
    histories = await served.db.fetch(
        'SELECT jsonb_array_length(history) AS n, attempts FROM "BatchOperations"'
    )
    assert {(r["n"], r["attempts"]) for r in histories} == {(1, 2)}


async def test_two_replays_of_the_same_operations_planned_differently_do_not_deadlock(
    database: str,
) -> None:
    """Two hands replay the same failures at once, one planned as an index scan (the rows
    in id order) and one as a sequential scan (in table order), both waiting on a row a
    third transaction holds. Once it lets go, one replays them all and the other none;
    neither dies in a deadlock (each would lock the rows in its plan's order otherwise)."""
    holder, by_index, by_scan = [await asyncpg.connect(database=database, **PG) for _ in range(3)]
    try:
        await holder.execute(
            """INSERT INTO "BatchOperations"
                   (id, operation_type, body, status, source, submitted_by, processed_at)
               SELECT gen_random_uuid(), 'T', '{}', 'FAIL', 'http', '', now() - g * interval '1s'
               FROM generate_series(1, 5000) AS g;
               ANALYZE "BatchOperations";"""
        )
        placed = await holder.fetch(
            """SELECT id::text FROM "BatchOperations" TABLESAMPLE BERNOULLI (1) REPEATABLE (7)
               ORDER BY ctid LIMIT 20"""
        )
        ids = [row["id"] for row in placed]
        while min(ids) == ids[0]:  # the held row (the least id) is not first in table order
            ids.pop(0)
        held = min(ids)
        await by_index.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        await by_scan.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
        await holder.execute("BEGIN")
        await holder.execute('SELECT 1 FROM "BatchOperations" WHERE id = $1::uuid FOR UPDATE', held)
        replayed: dict[str, int] = {}

        async def replay(name: str, conn: asyncpg.Connection) -> None:
            rows = await conn.fetch("SELECT id FROM streamsvc_replay($1::uuid[])", ids)
            replayed[name] = len(rows)

        async with anyio.create_task_group() as tg:
            tg.start_soon(replay, "by_index", by_index)
            await eventually(lambda: waiting(database, by_index), within=5)
            tg.start_soon(replay, "by_scan", by_scan)
            await eventually(lambda: waiting(database, by_scan), within=5)
            await holder.execute("COMMIT")
        assert sorted(replayed.values()) == [0, len(ids)], replayed
    finally:
        for conn in (holder, by_index, by_scan):
            await conn.close()


async def waiting(database: str, conn: asyncpg.Connection) -> bool:
    """``conn`` waits for a lock (asked on a connection of its own: one in a transaction
    would see the activity as it was when the transaction began)."""
    observer = await asyncpg.connect(database=database, **PG)
    try:
        event = await observer.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
        )
    finally:
        await observer.close()
    return bool(event == "Lock")


# -- pause and resume --------------------------------------------------------------------------
async def test_a_paused_type_is_stored_not_applied_and_applied_in_order_after_resume(
    served: Served,
) -> None:
    paused = await served.http.post("/api/types/ORDER_CREATED/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["operationType"] == "ORDER_CREATED"
    held = await post_batch(served, *(order(n) for n in range(1, 41)))
    payment = {
        "operationType": "PAYMENT",
        "table": "payments",
        "action": "insert",
        "values": {"id": 1, "order_id": 1, "amount": 1},
    }
    (other,) = await post_batch(served, payment)
    await until_status(served.db, [other], "SUCCESS")  # other types go on

    async def all_held() -> bool:
        count = await served.db.fetchval('SELECT count(*) FROM "BatchOperations" WHERE paused')
        return bool(count == len(held))

    await eventually(all_held)
    assert await served.db.fetchval("SELECT count(*) FROM orders") == 0
    view = (await served.http.get(f"/api/operations/{held[0]}")).json()
    assert (view["status"], view["paused"]) == ("UNPROCESSED", True)
    listed = (await served.http.get("/api/types/paused")).json()
    assert [(p["operationType"], p["held"]) for p in listed] == [("ORDER_CREATED", 40)]
    gauge = "streamsvc_paused_operation_types 1.0"
    assert gauge in (await served.http.get("/metrics")).text
    resumed = await served.http.post("/api/types/ORDER_CREATED/resume")
    assert resumed.json() == {"operationType": "ORDER_CREATED", "released": 40}
    await until_status(served.db, held, "SUCCESS")
    assert (await served.http.get("/api/types/paused")).json() == []
    assert "streamsvc_paused_operation_types 0.0" in (await served.http.get("/metrics")).text
    # Released in the order they were stored, they landed in it (one batch: by position).
    landed = [r["id"] for r in await served.db.fetch("SELECT id FROM orders ORDER BY ctid")]
    assert landed == list(range(1, 41))


async def test_once_pause_answers_no_batch_applies_the_type(served: Served) -> None:
    stop = anyio.Event()

    async def feed() -> None:
        n = 0
        while not stop.is_set():
            await post_batch(served, *(order(n + i) for i in range(1, 51)))
            n += 50

    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        await eventually(lambda: served.db.fetchval("SELECT count(*) > 100 FROM orders"), within=20)
        assert (await served.http.post("/api/types/ORDER_CREATED/pause")).status_code == 200
        answered = await served.db.fetchval("SELECT clock_timestamp()")
        landed = await served.db.fetchval("SELECT count(*) FROM orders")
        await anyio.sleep(1)
        stop.set()
    # No batch that was applying the type when the pause came commits after it answered.
    assert await served.db.fetchval("SELECT count(*) FROM orders") == landed
    late = await served.db.fetchval(
        'SELECT count(*) FROM "BatchOperations" WHERE status = $1 AND processed_at > $2',
        "SUCCESS",
        answered,
    )
    assert late == 0, "a batch applied a paused type after its pause answered"
    await served.http.post("/api/types/ORDER_CREATED/resume")
    pending = await served.db.fetch('SELECT id::text FROM "BatchOperations"')
    await until_status(served.db, [r[0] for r in pending], "SUCCESS")
    assert await served.db.fetchval("SELECT count(*) FROM orders") == len(pending)


async def test_pausing_needs_an_admin_key_and_a_valid_type(database: str, prefix: str) -> None:
    async with served_with_clients(keyed_settings(database, prefix)) as served:
        keys = served.service.keys
        assert keys is not None
        user = await keys.create(
            served.db, "user", tables=["orders"], actions=["insert"], allow_sql=False
        )
        admin = await keys.create(
            served.db, "ops", tables=["orders"], actions=["insert"], allow_sql=False, admin=True
        )
        await keys.load(served.db)
        for path in ("/api/types/ORDER_CREATED/pause", "/api/types/ORDER_CREATED/resume"):
            refused = await served.http.post(path, headers={"x-api-key": user})
            assert refused.status_code == 403, refused.text
            assert refused.json()["errors"] == [{"field": "key", "reason": "needs the admin scope"}]
        assert (
            await served.http.get("/api/types/paused", headers={"x-api-key": user})
        ).status_code == 403
        assert (await served.http.post("/api/types/X/pause")).status_code == 401
        ops = {"x-api-key": admin}
        for bad in ("%00", "a" * 300):
            refused = await served.http.post(f"/api/types/{bad}/pause", headers=ops)
            assert refused.status_code == 422, refused.text
            assert refused.json()["errors"][0]["field"] == "operationType"
        assert await served.db.fetchval("SELECT count(*) FROM streamsvc_paused_types") == 0
        paused = await served.http.post("/api/types/ORDER_CREATED/pause", headers=ops)
        assert paused.json()["pausedBy"] == "ops"


async def test_operations_held_for_a_type_no_longer_paused_are_let_go_by_the_sweeper(
    served: Served,
) -> None:
    manage = served.service.ingress.manage
    await manage.pause("ORDER_CREATED", by="test")
    held = await post_batch(served, *(order(n) for n in range(1, 11)))
    await eventually(
        lambda: served.db.fetchval('SELECT count(*) = 10 FROM "BatchOperations" WHERE paused')
    )
    # A resume that stopped after its first statement: the type is resumed, its operations
    # still held.
    await served.db.execute("DELETE FROM streamsvc_paused_types")
    report = await served.service.sweeper.sweep()
    assert report.released_paused == 10
    await until_status(served.db, held, "SUCCESS")


async def test_a_paused_operation_can_be_cancelled(served: Served) -> None:
    await served.service.ingress.manage.pause("ORDER_CREATED", by="test")
    (op_id,) = await post_batch(served, order(1))
    await eventually(lambda: served.db.fetchval('SELECT bool_and(paused) FROM "BatchOperations"'))
    cancelled = await served.http.delete(f"/api/operations/{op_id}")
    assert (cancelled.json()["status"], cancelled.json()["paused"]) == ("CANCELLED", False)
    assert await served.service.ingress.manage.resume("ORDER_CREATED") == 0


async def test_history_keeps_the_last_endings_of_an_operation_replayed_for_ever(
    served: Served,
) -> None:
    (op_id,) = await failed(served, 1)
    store = served.service.ingress.store
    for n in range(HISTORY_KEPT + 5):
        assert (await store.replay([op_id])).ids == [op_id]
        await served.db.execute(
            """UPDATE "BatchOperations" SET status = 'FAIL', error = $2, attempts = $3
               WHERE id = $1::uuid""",
            op_id,
            f"failure {n}",
            n + 2,
        )
    view = (await served.http.get(f"/api/operations/{op_id}")).json()
    assert len(view["history"]) == HISTORY_KEPT
    assert view["history"][-1]["error"] == f"failure {HISTORY_KEPT + 3}"
    assert view["history"][0]["error"] == "failure 4"
