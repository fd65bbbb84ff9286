"""The flusher over the in-memory store and fakeredis: no servers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import fakeredis
import msgspec
import pytest

from streamsvc.actors.flusher import Flusher
from streamsvc.adapters import streams as rs
from streamsvc.errors import PermanentError, TransientError
from streamsvc.model import Operation, Outcome, Status, WorkOp, outcomes_decoder, work_decoder
from streamsvc.policy import BandTurns, RetryPolicy
from streamsvc.store import Applied, NewOperation
from streamsvc.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

RETRY = RetryPolicy(max_attempts=3, base_ms=1, cap_ms=2)


def op(n: int, **fields: object) -> Operation:
    raw = {"operationType": "T", "table": "orders", "action": "insert", "values": {"id": n}}
    return msgspec.convert({**raw, **fields}, Operation)


def new(n: int, **fields: object) -> NewOperation:
    run_at = fields.pop("run_at", None)
    assert run_at is None or isinstance(run_at, dt.datetime)
    return NewOperation(f"op-{n}", op(n, **fields), "api", "caller", run_at)


class Rig:
    """A memory store, fake streams and one flusher reading them."""

    def __init__(self, *, limit: int = 100, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()
        self.streams = rs.Streams(fakeredis.FakeAsyncRedis(), rs.Names("t"))
        self.flusher = Flusher("f", self.store, self.streams, RETRY, limit=limit)

    async def submit(self, rows: Sequence[NewOperation], chunk: int = 100) -> None:
        """As the ingress does: store, then put what is ready on the work streams."""
        stored = await self.store.intake(rows)
        await self.streams.add_each(rs.work_entries(self.streams.names, stored.ready, chunk))

    async def outcomes(self) -> list[Outcome]:
        entries = await self.streams.redis.xrange(self.streams.names.outcomes)
        return [o for _, fields in entries for o in outcomes_decoder.decode(fields[b"o"])]

    def count_takes(self, measure: Callable[[list[rs.Taken]], int]) -> list[int]:
        """``measure`` of each take the flusher makes, in order, from now on."""
        take = self.streams.take
        seen: list[int] = []

        async def counting(
            streams: Sequence[str], group: str, consumer: str, **how: Any
        ) -> list[rs.Taken]:
            got = await take(streams, group, consumer, **how)
            seen.append(measure(got))
            return got

        self.streams.take = counting  # type: ignore[method-assign]
        return seen

    async def waiting(self) -> int:
        names = self.streams.names
        return sum([await self.streams.length(s) for s in names.work_streams])


async def test_a_batch_is_applied_once_reported_and_acked() -> None:
    rig = Rig()
    await rig.submit([new(n) for n in range(10)])
    await rig.flusher.run(burst=True)
    assert rig.store.applied == [f"op-{n}" for n in range(10)]
    assert {o.status for o in await rig.outcomes()} == {Status.SUCCESS}
    assert await rig.waiting() == 0


async def test_a_redelivered_entry_applies_nothing_twice_and_reports_again() -> None:
    rig = Rig()
    stored = await rig.store.intake([new(1)])
    entries = rs.work_entries(rig.streams.names, stored.ready, 10)
    for _ in range(2):
        await rig.streams.add_each(entries)
        await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-1"]
    assert [o.id for o in await rig.outcomes()] == ["op-1", "op-1"]


async def test_the_database_refusing_one_operation_fails_it_alone() -> None:
    rig = Rig(store=MemoryStore(refuse=lambda w: "bad" if w.id == "op-3" else None))
    await rig.submit([new(n) for n in range(5)])
    await rig.flusher.run(burst=True)
    by_id = {o.id: o for o in await rig.outcomes()}
    assert by_id["op-3"].status is Status.FAIL and by_id["op-3"].error == "bad"
    assert rig.store.applied == ["op-0", "op-1", "op-2", "op-4"]


async def test_a_transient_error_is_retried_and_counted_as_an_attempt() -> None:
    rig = Rig()
    rig.store.failures.append(TransientError("connection reset"))
    await rig.submit([new(1)])
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-1"]
    assert rig.store.rows["op-1"].attempts == 2  # the failed try, and the one that applied


async def test_a_permanent_error_fails_the_batch_and_releases_its_keys() -> None:
    rig = Rig()
    rig.store.failures.append(PermanentError("cannot ever apply"))
    await rig.submit([new(1, orderingKey="k"), new(2, orderingKey="k")])
    await rig.flusher.run(burst=True)
    statuses = {o.id: o.status for o in await rig.outcomes()}
    assert statuses == {"op-1": Status.FAIL, "op-2": Status.SUCCESS}  # the key went on


async def test_higher_priority_entries_are_taken_first() -> None:
    rig = Rig(limit=1)
    await rig.submit([new(n) for n in range(5)], chunk=1)
    await rig.submit([new(n, priority=9) for n in range(5, 10)], chunk=1)
    await rig.flusher.run(burst=True)
    assert rig.store.applied[:5] == [f"op-{n}" for n in range(5, 10)]
    assert sorted(rig.store.applied) == sorted(f"op-{n}" for n in range(10))


async def test_a_fresh_flusher_takes_one_entry_of_a_backlog_not_all_of_it() -> None:
    """Entries hold up to ``limit`` operations each: a flusher that has seen none yet takes
    one, leaving the rest of a backlog to the other flushers (and to higher bands' turns)."""
    rig = Rig(limit=10)
    await rig.submit([new(n) for n in range(50)], chunk=10)  # five full entries
    taken = rig.count_takes(len)
    await rig.flusher.run(burst=True)
    assert taken[:5] == [1, 1, 1, 1, 1]
    assert sorted(rig.store.applied) == sorted(f"op-{n}" for n in range(50))


async def test_a_trickle_of_small_entries_above_does_not_fill_takes_with_full_ones() -> None:
    """One-operation entries at priority 9 beside full entries at 0: a take stays about
    one transaction, so an operation at 9 waits only for the transactions in flight."""
    rig = Rig(limit=10)
    await rig.submit([new(n) for n in range(100)], chunk=10)  # ten full entries at 0
    await rig.submit([new(n, priority=9) for n in range(100, 140)], chunk=1)
    sizes = rig.count_takes(
        lambda got: sum(len(work_decoder.decode(f[b"ops"])) for _, (_, f) in got)
    )
    await rig.flusher.run(burst=True)
    assert len(rig.store.applied) == 140
    assert max(sizes) <= 2 * 10, sizes


def test_every_band_leads_in_proportion_to_its_weight_so_none_starves() -> None:
    turns = BandTurns()
    leads = [turns.next()[0] for _ in range(55)]
    assert {band: leads.count(band) for band in range(10)} == {p: p + 1 for p in range(10)}
    first = turns.next()
    assert sorted(first) == list(range(10)) and first[1:] == sorted(first[1:], reverse=True)


async def test_operations_with_one_key_apply_in_order_one_at_a_time() -> None:
    rig = Rig()
    stored = await rig.store.intake([new(n, orderingKey="k" if n % 2 else "j") for n in range(10)])
    assert [w.id for w in stored.ready] == ["op-0", "op-1"]  # each key's head; the rest wait
    await rig.streams.add_each(rs.work_entries(rig.streams.names, stored.ready, 100))
    await rig.flusher.run(burst=True)
    assert [i for i in rig.store.applied if int(i[3:]) % 2] == [f"op-{n}" for n in (1, 3, 5, 7, 9)]
    assert len(rig.store.applied) == 10


async def test_a_cancelled_operation_is_never_applied_though_its_entry_is_taken() -> None:
    rig = Rig()
    await rig.submit([new(1), new(2)])
    cancelled = await rig.store.cancel("op-1", owner=None, looker=None)
    assert cancelled.verdict == "cancelled"
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-2"]
    assert [o.id for o in await rig.outcomes()] == ["op-2"]  # the cancel announces its own


async def test_an_operation_put_on_a_stream_before_its_time_waits_for_it_again() -> None:
    rig = Rig()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    stored = await rig.store.intake([new(1, run_at=later)])
    assert stored.ready == []
    row = rig.store.rows["op-1"]
    await rig.streams.add_each(rs.work_entries(rig.streams.names, [row.op], 10))
    row.wake_at = None  # as a scheduler whose clock runs ahead would have taken it
    await rig.flusher.run(burst=True)
    assert rig.store.applied == [] and row.wake_at == later
    assert await rig.outcomes() == []


async def test_a_first_turn_takes_about_limit_operations_so_later_priorities_overtake() -> None:
    rig = Rig(limit=10)
    await rig.submit([new(n) for n in range(100)], chunk=10)  # a stored backlog, 10 entries
    apply = rig.store.apply

    async def arriving_meanwhile(
        items: Sequence[WorkOp], *, batch_id: str | None = None
    ) -> Applied:
        if not rig.store.applied:  # while the first batch is applied, priority 9 comes
            await rig.submit([new(1000, priority=9)])
        return await apply(items, batch_id=batch_id)

    rig.store.apply = arriving_meanwhile  # type: ignore[method-assign]
    await rig.flusher.run(burst=True)
    assert len(rig.store.applied) == 101
    assert rig.store.applied.index("op-1000") <= 20, "it waited for the whole backlog"


async def test_one_callers_key_never_holds_back_another_callers_same_key() -> None:
    rig = Rig()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    hostile = NewOperation("held", op(1, orderingKey="k"), "api", "hostile", later)
    stored = await rig.store.intake([hostile, new(2, orderingKey="k")])
    assert [w.id for w in stored.ready] == ["op-2"]
    await rig.streams.add_each(rs.work_entries(rig.streams.names, stored.ready, 10))
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-2"]


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xdc", b"\xdc\x01", b"\xdd\x00\x00", b"not msgpack", b"\x93\x01"],
    ids=["empty", "array16-cut", "array16-short", "array32-cut", "text", "short-array"],
)
async def test_a_foreign_work_entry_is_dead_lettered_and_the_rest_applied(raw: bytes) -> None:
    """Whatever an entry's `ops` holds, taking it (whose script counts each entry's
    operations from its header) goes on: the entry is dead-lettered, the others land."""
    rig = Rig()
    names = rig.streams.names
    await rig.submit([new(1)])
    await rig.streams.add(names.work_of(0), [{"ops": raw}])
    await rig.submit([new(2)])
    await rig.flusher.run(burst=True)
    assert rig.store.applied == ["op-1", "op-2"]
    assert await rig.streams.length(names.dead) == 1
    assert await rig.waiting() == 0
