"""Queue management (streamsvc.manage) over the memory store and fakeredis: no servers."""

from __future__ import annotations

import msgspec
import pytest

from streamsvc.errors import InvalidOperation
from streamsvc.manage import Manager
from streamsvc.model import Status
from streamsvc.store import Selection
from streamsvc.store.memory import MemoryStore
from streamsvc.validate import Caller
from tests.unit.test_sweeper import Rig, new

pytestmark = pytest.mark.anyio


def manager(rig: Rig) -> Manager:
    return Manager(rig.store, rig.streams, chunk=100)


async def test_a_paused_type_is_held_at_its_claim_and_let_go_in_the_order_stored() -> None:
    rig = Rig()
    manage = manager(rig)
    await manage.pause("T", by="ops")
    await rig.submit([new(n) for n in range(5)])
    await rig.submit([new(9, operationType="OTHER")])
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-9"], "other types go on"
    assert all(rig.store.rows[f"op-{n}"].paused for n in range(5))
    assert await rig.queued() == [], "held operations are off the streams"
    assert (await rig.sweeper.sweep()).reenqueued_rows == 0, "and the sweeper leaves them"
    assert [(p.operation_type, p.held) for p in await manage.paused_types()] == [("T", 5)]
    assert await manage.resume("T") == 5
    assert await rig.queued() == [f"op-{n}" for n in range(5)]
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-9", *(f"op-{n}" for n in range(5))]
    assert await manage.paused_types() == []


async def test_a_type_is_checked_as_an_operation_s_would_be() -> None:
    manage = manager(Rig())
    for bad, reason in (("", "must not be empty"), ("a\x00b", "contains a control character")):
        with pytest.raises(InvalidOperation) as refused:
            await manage.pause(bad, by="ops")
        assert (refused.value.field, refused.value.reason) == ("operationType", reason)


async def test_retry_replays_only_what_ended_without_being_applied() -> None:
    rig = Rig()
    rig.store.refuse = lambda w: "refused" if w.id == "op-1" else None
    await rig.submit([new(1), new(2)])
    await rig.flusher.run(burst=True)
    manage = manager(rig)
    succeeded = await manage.retry("op-2")
    assert succeeded.verdict == "unknown", "not a UUID: no such operation"
    store: MemoryStore = rig.store
    assert (await store.retry("op-2", owner=None, looker=None)).verdict == "succeeded"
    rig.store.refuse = lambda _: None
    replayed = await store.retry("op-1", owner=None, looker=None)
    assert (replayed.verdict, [w.id for w in replayed.ready]) == ("replayed", ["op-1"])
    assert (await store.retry("op-1", owner=None, looker=None)).verdict == "pending"
    row = store.rows["op-1"]
    assert (row.status, row.attempts, [h.status for h in row.history]) == (
        Status.UNPROCESSED,
        1,
        [Status.FAIL],
    )
    assert (await store.retry("op-1", owner="someone else", looker=None)).verdict == "unknown"


async def test_replay_selects_by_type_and_counts_on_a_dry_run() -> None:
    rig = Rig()
    rig.store.refuse = lambda _: "refused"
    await rig.submit([new(1), new(2), new(3, operationType="OTHER")])
    await rig.flusher.run(burst=True)
    manage = manager(rig)
    assert await manage.replay(Selection(operation_type="T"), dry_run=True) == 2
    assert await manage.replay(Selection(), ids=["op-1", "op-3", "op-404"], dry_run=True) == 2
    assert {r.status for r in rig.store.rows.values()} == {Status.FAIL}
    assert await manage.replay(Selection(operation_type="T")) == 2
    assert sorted(await rig.queued()) == ["op-1", "op-2"]
    assert rig.store.rows["op-3"].status is Status.FAIL


async def test_a_key_retries_only_its_own() -> None:
    rig = Rig()
    rig.store.refuse = lambda _: "refused"
    row_id = "00000000-0000-4000-8000-000000000001"
    await rig.submit([msgspec.structs.replace(new(1), id=row_id)])  # submitted by "c"
    await rig.flusher.run(burst=True)
    manage = manager(rig)
    other = await manage.retry(row_id, caller=Caller(name="b"))
    assert (other.verdict, other.view) == ("unknown", None)
    own = await manage.retry(row_id, caller=Caller(name="c"))
    assert own.verdict == "replayed" and own.view is not None
