"""Ingress: validate, store in BatchOperations (group-committed), append to the work stream.

Submissions from every path queue up here; one or two committer loops take whatever has
queued, store it with a single multi-row INSERT, append it to the work stream in a few
entries, and only then answer. Under load the groups grow by themselves: while one commit
runs the next one gathers. Below it, each request would pay a commit of its own, so while
two or more callers wait for theirs, the next commit starts at most
STREAMSVC_INTAKE_GATHER_MS after the previous one (streamsvc.pacing): concurrent requests
share it. A lone caller sending one request after the other is never held back, nor is
what an inbox reader gathered already, nor a commit's worth of operations.

One caller never fails another: validation refuses what PostgreSQL would not take, and
should a group's INSERT still fail on the data, the group is halved until the bad
operations are alone; those are refused, the rest stored.

Every operation is its caller's: a keyed caller's is stored under an id derived from the
key's name and its userOperationId (or the door's default id), so idempotency is per key
and no key can take another's id in advance; it sees only its own operations unless it is
an admin. The anonymous caller (STREAMSVC_AUTH=off) keeps id == userOperationId and sees
everything.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import asyncpg
import msgspec
import structlog

from streamsvc import filters, metrics, sqlguard
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import translate
from streamsvc.catalog import Catalog
from streamsvc.errors import InvalidOperation
from streamsvc.manage import Manager
from streamsvc.model import (
    CountQuery,
    ListQuery,
    Operation,
    OperationCounts,
    OperationPage,
    OperationView,
    Receipt,
    Rejection,
    Status,
    derived_id,
    work_encoder,
)
from streamsvc.pacing import Pacer
from streamsvc.store import Cancelled, NewOperation, Store
from streamsvc.validate import ANONYMOUS, Caller, UnknownToCatalog, lookup, scope, validate

log = structlog.get_logger("streamsvc.ingress")

Result = Receipt | Rejection

_PER_KEY = uuid.UUID("3f1d9a8e-7c2b-5e4f-8a61-0d9c4b7e2f15")


def stored_id(caller: Caller, given: uuid.UUID | None, default: str | None) -> str:
    """The id an operation is stored under: the caller's userOperationId (``given``) or the
    door's default id, made the caller's own. Pure."""
    base = str(given) if given else default
    if base is None:
        return str(uuid.uuid4())
    if caller.name == ANONYMOUS.name:  # auth off: one caller, ids as the callers gave them
        return base
    # The name's length first, so no two (name, base) pairs make the same string.
    return derived_id(_PER_KEY, f"{len(caller.name)}:{caller.name}:{base}")


@dataclass(slots=True)
class _Ticket:
    """One caller's accepted operations, waiting for the next group commit."""

    ids: list[str]
    ops: list[Operation]
    source: str
    caller: str
    gathered: bool  # they waited for company on the way here (streamsvc.pacing)
    done: anyio.Event = field(default_factory=anyio.Event)
    results: list[Receipt | Rejection] = field(default_factory=list)
    error: BaseException | None = None


class Ingress:
    def __init__(
        self,
        store: Store,
        pool: asyncpg.Pool,
        streams: rs.Streams,
        catalog: Catalog,
        *,
        chunk: int,
        max_group: int = 20_000,
        pacer: Pacer | None = None,
    ) -> None:
        self.store = store
        self.manage = Manager(store, streams, chunk=chunk)  # retry, pause, resume
        self.pool = pool  # for reloading the catalog
        self.streams = streams
        self.catalog = catalog
        self.chunk = chunk  # operations per work-stream entry (BATCH_PROCESS_OPERATION_LIMIT)
        self.max_group = max_group
        self._queue: deque[_Ticket] = deque()
        self._queued = 0  # operations in the queue
        self._queued_gathered = 0  # tickets in the queue that gathered on their way here
        self._wake = anyio.Event()
        self.pacer = pacer or Pacer(0)  # the committers' (see the module docstring)
        self._waiting = 0  # submits queued or in a commit, not answered yet
        self._enough = anyio.Event()  # the gathering commit need not wait any longer
        # Called with the runAt of stored operations held for it (the scheduler's wake-up).
        self.on_held: Callable[[list[dt.datetime]], None] = lambda _: None

    # -- the Python API every path uses ---------------------------------------------
    async def submit(
        self,
        ops: list[Operation],
        *,
        caller: Caller,
        source: str,
        ids: list[str | None] | None = None,
        traces: list[str | None] | None = None,
        gathered: bool = False,
    ) -> list[Result]:
        """Store the valid operations, queue them for flushing, and say what became of each.

        ``ids`` gives default ids for operations without a userOperationId (the inbox uses
        ids derived from its entry ids, so a redelivered entry is not stored twice).
        ``traces`` gives the trace context each operation is stored with (its intake span's,
        streamsvc.tracing); none is stored otherwise, whatever the operation held.
        ``gathered``: the operations already waited for company (an inbox reader's
        gathering); their work entries say so, and the flushers take them at once."""
        results: list[Result | None] = [None] * len(ops)
        ticket = _Ticket([], [], source, caller.name, gathered)
        positions: list[int] = []
        for i, op in enumerate(ops):
            try:
                await self.check(op, caller)
            except InvalidOperation as exc:
                results[i] = Rejection(exc.field, exc.reason, i)
                continue
            default = ids[i] if ids is not None else None
            ticket.ids.append(stored_id(caller, op.user_operation_id, default))
            trace = traces[i] if traces is not None else None
            if op.api_key or op.traceparent != trace:
                op = msgspec.structs.replace(op, api_key=None, traceparent=trace)
            ticket.ops.append(op)
            positions.append(i)
        if len(positions) < len(ops):
            metrics.rejected.labels(source).inc(len(ops) - len(positions))
        if ticket.ops:
            self._queue.append(ticket)
            self._queued += len(ticket.ops)
            self._queued_gathered += gathered
            self._wake.set()
            if self._queue_full():
                self._enough.set()
            self._waiting += 1
            try:
                await ticket.done.wait()
            finally:
                self._waiting -= 1
            if ticket.error is not None:
                raise ticket.error
            for i, result in zip(positions, ticket.results, strict=True):
                stored = isinstance(result, Receipt)
                results[i] = result if stored else msgspec.structs.replace(result, index=i)
        return [r for r in results if r is not None]

    async def get(self, op_id: str, *, caller: Caller | None = None) -> OperationView | None:
        """The operation whose id, or whose caller's userOperationId, is ``op_id``, and where
        it stands; None when unknown. ``caller`` sees only its own operations unless it is an
        admin: another caller's answers None, exactly as an unknown id (None: the service
        itself, which sees all)."""
        scoped = lookup(op_id, caller)
        if scoped is None:
            return None
        owner, looker = scoped
        return await self.store.get(op_id, owner=owner, looker=looker)

    async def list_operations(
        self, query: ListQuery, *, caller: Caller | None = None
    ) -> OperationPage:
        """A page of the operations ``query`` selects, newest first: ``caller``'s own unless
        it is an admin (None: the service itself, which sees all)."""
        owner, _ = scope(caller)
        return await self.store.list_operations(filters.list_query(query), owner=owner)

    async def count_operations(
        self, query: CountQuery, *, caller: Caller | None = None
    ) -> OperationCounts:
        """How many of the operations ``list_operations`` shows ``caller`` were created in
        ``query``'s window, by status and by operationType and status."""
        since, until = filters.count_window(query, dt.datetime.now(dt.UTC))
        owner, _ = scope(caller)
        return await self.store.counts(since, until, owner=owner)

    async def cancel(self, op_id: str, *, caller: Caller | None = None) -> Cancelled:
        """Cancel the operation ``get`` would find for ``caller``, unless it has finished;
        a cancelled operation's outcome goes to the notifier as any final status does. The
        answer carries the operation as it stands after (None: unknown to ``caller``)."""
        scoped = lookup(op_id, caller)
        if scoped is None:
            return Cancelled("unknown")
        owner, looker = scoped
        result = await self.store.cancel(op_id, owner=owner, looker=looker)
        adds = self.streams.spread(result.released, self.chunk)
        if result.outcome is not None:
            outcome = {"o": work_encoder.encode([result.outcome])}
            adds.append((self.streams.next_shard().outcomes, outcome))
            metrics.cancelled.inc()
        try:
            await self.streams.add_each(adds)
        except rs.CONNECTION_EXCEPTIONS as exc:
            log.warning(
                "ingress.cancel_not_announced",
                id=op_id,
                error=str(exc),
                next="cancelled; the sweeper puts any released operation on a stream",
            )
        if result.verdict != "unknown":
            result.view = await self.get(op_id, caller=caller)
        return result

    async def check(self, op: Operation, caller: Caller) -> None:
        """Validate; when the loaded schema lacks a name, reload it once and look again."""
        try:
            await self._validate(op, caller)
        except UnknownToCatalog:
            async with self.pool.acquire() as conn:
                if not await self.catalog.refresh(conn):
                    raise
            await self._validate(op, caller)

    async def _validate(self, op: Operation, caller: Caller) -> None:
        """``validate``; in a worker thread for SQL not seen before, whose check can take a
        large fraction of a second: every other caller's request goes on meanwhile."""
        if op.sql is None or sqlguard.remembered(op.sql, self.catalog.allow, caller.tables):
            validate(op, self.catalog, caller)
        else:
            await anyio.to_thread.run_sync(validate, op, self.catalog, caller)

    # -- the committer loop ------------------------------------------------------------
    async def run(self) -> None:
        while True:
            async with self.pacer.turn():
                while not self._queue:  # every committer waits on the same event
                    if self._wake.is_set():
                        self._wake = anyio.Event()
                    await self._wake.wait()
                await self._gather()
                full = self._queue_full()
                tickets = self._take()
                self.pacer.started(full=full)
            with anyio.CancelScope(shield=True):
                await self._commit(tickets)

    async def _gather(self) -> None:
        """Let concurrent requests share the next commit: wait as the pacer says while two
        or more submitters wait (one queued, another queued or in a commit), until the
        queue holds what gathered already or a commit's worth."""
        wait = self.pacer.wait_s()
        if wait <= 0 or self._waiting < 2 or self._queue_full():
            return
        self._enough = anyio.Event()
        with anyio.move_on_after(wait):
            await self._enough.wait()

    def _queue_full(self) -> bool:
        """Whether the queue goes at once: it holds what gathered already, or a commit's
        worth."""
        return self._queued_gathered > 0 or self._queued >= self.chunk

    def _take(self) -> list[_Ticket]:
        tickets: list[_Ticket] = []
        count = 0
        while self._queue and (not tickets or count + len(self._queue[0].ops) <= self.max_group):
            ticket = self._queue.popleft()
            tickets.append(ticket)
            count += len(ticket.ops)
            self._queued_gathered -= ticket.gathered
        self._queued -= count
        return tickets

    async def _commit(self, tickets: list[_Ticket]) -> None:
        now = dt.datetime.now(dt.UTC)
        rows: list[NewOperation] = []
        places: list[tuple[int, int]] = []  # (ticket, operation) of each row
        refused: dict[tuple[int, int], str] = {}
        for t, ticket in enumerate(tickets):
            for j, (op_id, op) in enumerate(zip(ticket.ids, ticket.ops, strict=True)):
                try:
                    run_at = _run_at(op, now)
                except (ValueError, OverflowError) as exc:
                    refused[(t, j)] = f"cannot be stored: {exc}"
                    continue
                rows.append(NewOperation(op_id, op, ticket.source, ticket.caller, run_at))
                places.append((t, j))
        metrics.intake_size.observe(len(rows))
        try:
            stored = await self.store.intake(rows)
            if stored.ready:
                await self.streams.enqueue(
                    stored.ready,
                    self.chunk,
                    log=log,
                    event="ingress.enqueue_failed",
                    gathered=all(t.gathered for t in tickets),
                )
            held = [r.run_at for r in rows if r.run_at and r.run_at > now]
            if held:
                self.on_held(held)
            existing = await self.store.states([r.id for r in rows if r.id not in stored.created])
        except Exception as exc:
            error = translate(exc)
            log.warning("ingress.store_failed", error=str(error), operations=len(rows))
            for ticket in tickets:
                ticket.error = error
                ticket.done.set()
            return
        refused.update((places[n], reason) for n, reason in stored.refused.items())
        for t, ticket in enumerate(tickets):
            seen: set[str] = set()
            for j, (op_id, op) in enumerate(zip(ticket.ids, ticket.ops, strict=True)):
                reason = refused.get((t, j))
                if reason is not None:
                    ticket.results.append(Rejection("body", reason))
                    continue
                is_new = op_id in stored.created and op_id not in seen
                seen.add(op_id)
                state = existing.get(op_id)
                if is_new or state is None:
                    receipt = Receipt(op_id, op.operation_type, Status.UNPROCESSED, is_new)
                else:
                    receipt = Receipt(op_id, state.operation_type, state.status, False)
                ticket.results.append(receipt)
            accepted = sum(isinstance(r, Receipt) for r in ticket.results)
            metrics.received.labels(ticket.source).inc(accepted)
            if accepted < len(ticket.ops):
                metrics.rejected.labels(ticket.source).inc(len(ticket.ops) - accepted)
            ticket.done.set()


def _run_at(op: Operation, now: dt.datetime) -> dt.datetime | None:
    if op.run_at is not None:
        return op.run_at if op.run_at.tzinfo else op.run_at.replace(tzinfo=dt.UTC)
    if op.delay_ms is not None:
        return now + dt.timedelta(milliseconds=op.delay_ms)
    return None
