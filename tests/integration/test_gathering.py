"""Gathering on the real servers (streamsvc.pacing, docs/efficiency.md): operations that keep
coming close behind each other are applied by one batch, while each caller is answered as
soon as its operation is stored; one after a quiet moment is not held back at all; what
gathered once (in an inbox reader, in a batch) is not held back again."""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import pytest

from streamsvc.adapters import streams as rs
from streamsvc.model import Operation
from streamsvc.validate import ANONYMOUS, Caller
from tests.conftest import make_settings
from tests.pipeline import (
    events_on,
    eventually,
    ops,
    order,
    post_batch,
    running,
    served_with_clients,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

GATHER_MS = 1500


async def test_requests_close_behind_each_other_are_answered_at_once_and_share_a_batch(
    database: str, prefix: str
) -> None:
    settings = make_settings(database, prefix, STREAMSVC_GATHER_MS=str(GATHER_MS))
    async with served_with_clients(settings) as served:
        started = time.monotonic()
        (first,) = await post_batch(served, order(1))
        assert time.monotonic() - started < GATHER_MS / 1000 / 2, "held back after a lull"
        ids: list[str] = []

        async def post(n: int) -> None:
            await anyio.sleep(0.05 * n)  # one request every 50 ms, each on its own
            sent = time.monotonic()
            ids.extend(await post_batch(served, order(n)))
            assert time.monotonic() - sent < GATHER_MS / 1000 / 2, "an answer held back"

        async with anyio.create_task_group() as tg:
            for n in range(2, 5):
                tg.start_soon(post, n)

        async def finished() -> bool:
            done = await served.db.fetchval(
                """SELECT count(*) FROM "BatchOperations" WHERE status = 'SUCCESS'"""
            )
            return bool(done == 4)

        await eventually(finished, within=15)
        rows = await served.db.fetch(
            """SELECT batch_id FROM "BatchOperations" WHERE id = ANY($1::uuid[])""",
            ids,
        )
        assert len({r["batch_id"] for r in rows}) == 1, "applied by one batch transaction"
        alone = await served.db.fetchval(
            """SELECT batch_id FROM "BatchOperations" WHERE id = $1::uuid""", first
        )
        assert alone not in {r["batch_id"] for r in rows}


async def test_work_entries_say_whether_their_operations_gathered_on_the_way_in(
    database: str, prefix: str
) -> None:
    """The inbox readers gather, so their work entries are marked and no flusher waits on
    them again; a request's operations did not gather and are not marked."""
    settings = make_settings(database, prefix, STREAMSVC_GATHER_MS=str(GATHER_MS))
    async with running(settings) as service:
        streams = service.streams
        await streams.redis.xadd(streams.names.inbox, {"op": msgspec.json.encode(order(1))})
        await service.inbox.run(burst=True)
        await service.ingress.submit(ops([order(2)]), caller=ANONYMOUS, source="api")
        entries = await streams.redis.xrange(streams.names.work)
    assert [rs.gathered(fields) for _, fields in entries] == [True, False]


async def test_entries_stored_one_by_one_after_a_failure_are_still_marked_gathered(
    database: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When storing a read's entries together fails beyond validation, each is stored
    alone; they gathered all the same, and no flusher waits on them again."""
    settings = make_settings(database, prefix, STREAMSVC_GATHER_MS=str(GATHER_MS))
    async with running(settings) as service:
        check = service.ingress.check

        async def exploding(op: Operation, caller: Caller) -> None:
            if op.operation_type == "EXPLODE":
                raise RuntimeError("a bug in validation")
            await check(op, caller)

        monkeypatch.setattr(service.ingress, "check", exploding)
        streams = service.streams
        for raw in (order(1), {**order(2), "operationType": "EXPLODE"}, order(3)):
            await streams.redis.xadd(streams.names.inbox, {"op": msgspec.json.encode(raw)})
        await service.inbox.run(burst=True)
        entries = await streams.redis.xrange(streams.names.work)
    assert [rs.gathered(fields) for _, fields in entries] == [True, True]


async def test_a_cancel_close_behind_another_is_announced_at_once(
    database: str, prefix: str
) -> None:
    """Each batch's (and each cancel's) outcomes travel in one entry: the notifier relays
    what it reads at once, instead of waiting for more after a relay that just ran."""
    settings = make_settings(database, prefix, STREAMSVC_GATHER_MS=str(GATHER_MS))
    async with served_with_clients(settings) as served:
        events = await events_on(served, "ORDER_CREATED.CANCELLED")
        held = await post_batch(served, order(1, delayMs=60_000), order(2, delayMs=60_000))
        for n, op_id in enumerate(held, start=1):
            cancelled = time.monotonic()
            assert (await served.http.delete(f"/api/operations/{op_id}")).status_code == 200

            async def announced() -> bool:
                return (await events.get(fail=False, no_ack=True)) is not None

            await eventually(announced, within=10, every=0.01)
            took = time.monotonic() - cancelled
            assert took < GATHER_MS / 1000 / 2, f"cancel {n} announced after {took:.2f} s"


INTAKE_GATHER_MS = 1500


async def _submit_timed(service: Any, raw: list[dict[str, Any]], took: dict[str, float]) -> None:
    started = time.monotonic()
    results = await service.ingress.submit(ops(raw), caller=ANONYMOUS, source="api")
    for result in results:
        took[result.id] = time.monotonic() - started


async def _commits(service: Any, ids: list[str]) -> int:
    """How many group commits stored ``ids`` (each INSERT's rows share its created_at)."""
    return int(
        await service.pool.fetchval(
            'SELECT count(DISTINCT created_at) FROM "BatchOperations" WHERE id = ANY($1::uuid[])',
            ids,
        )
    )


async def test_a_lone_caller_is_never_held_back_and_concurrent_requests_share_one_commit(
    database: str, prefix: str
) -> None:
    settings = make_settings(database, prefix, STREAMSVC_INTAKE_GATHER_MS=str(INTAKE_GATHER_MS))
    async with running(settings) as service:
        alone: dict[str, float] = {}
        for n in range(1, 4):  # one request after the other, close behind each other
            await _submit_timed(service, [order(n)], alone)
        assert max(alone.values()) < INTAKE_GATHER_MS / 1000 / 2, f"held back: {alone}"
        assert await _commits(service, list(alone)) == 3

        together: dict[str, float] = {}

        async def later(n: int) -> None:
            await anyio.sleep(0.05 * n)
            await _submit_timed(service, [order(10 + n)], together)

        async with anyio.create_task_group() as tg:  # two at once, then one every 50 ms
            for n in (0, 0, 1, 2, 3, 4):
                tg.start_soon(later, n)
        assert len(together) == 6
        assert await _commits(service, list(together)) == 1, "the concurrent ones, together"
        assert max(together.values()) < INTAKE_GATHER_MS / 1000 + 1


async def test_a_commits_worth_of_concurrent_requests_is_not_held_back(
    database: str, prefix: str
) -> None:
    settings = make_settings(
        database,
        prefix,
        STREAMSVC_INTAKE_GATHER_MS=str(INTAKE_GATHER_MS),
        BATCH_PROCESS_OPERATION_LIMIT="4",
    )
    async with running(settings) as service:
        took: dict[str, float] = {}
        await _submit_timed(service, [order(1)], took)  # a commit just started
        async with anyio.create_task_group() as tg:
            tg.start_soon(_submit_timed, service, [order(2), order(3)], took)
            tg.start_soon(_submit_timed, service, [order(4), order(5)], took)
        assert len(took) == 5
        assert max(took.values()) < INTAKE_GATHER_MS / 1000 / 2, f"held back: {took}"
