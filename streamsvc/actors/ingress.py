"""Ingress: validate, store in BatchOperations (group-committed), append to the work stream.

Submissions from every path queue up here; one or two committer loops take whatever has
queued, store it with a single multi-row INSERT, append it to the work stream in a few
entries, and only then answer. Under load the groups grow by themselves: while one commit
runs the next one gathers.

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
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import msgspec
import structlog

from streamsvc import metrics, queries, sqlguard
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import translate
from streamsvc.catalog import Catalog
from streamsvc.errors import InvalidOperation
from streamsvc.model import (
    Operation,
    OperationView,
    Receipt,
    Rejection,
    Status,
    WorkOp,
    derived_id,
    json_encoder,
    operation_decoder,
    work_encoder,
)
from streamsvc.validate import ANONYMOUS, Caller, UnknownToCatalog, validate

log = structlog.get_logger("streamsvc.ingress")

Result = Receipt | Rejection
_Place = tuple[int, int]  # (ticket, operation) in one group
_Row = tuple[_Place, tuple[Any, ...]]  # a place and its INSERT_OPERATIONS values

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
    done: anyio.Event = field(default_factory=anyio.Event)
    results: list[Receipt | Rejection] = field(default_factory=list)
    error: BaseException | None = None


class Ingress:
    def __init__(
        self,
        pool: asyncpg.Pool,
        streams: rs.Streams,
        catalog: Catalog,
        *,
        chunk: int,
        max_group: int = 20_000,
    ) -> None:
        self.pool = pool
        self.streams = streams
        self.catalog = catalog
        self.chunk = chunk  # operations per work-stream entry (BATCH_PROCESS_OPERATION_LIMIT)
        self.max_group = max_group
        self._queue: deque[_Ticket] = deque()
        self._wake = anyio.Event()

    # -- the Python API every path uses ---------------------------------------------
    async def submit(
        self,
        ops: list[Operation],
        *,
        caller: Caller,
        source: str,
        ids: list[str | None] | None = None,
    ) -> list[Result]:
        """Store the valid operations, queue them for flushing, and say what became of each.

        ``ids`` gives default ids for operations without a userOperationId (the inbox uses
        ids derived from its entry ids, so a redelivered entry is not stored twice)."""
        results: list[Result | None] = [None] * len(ops)
        ticket = _Ticket([], [], source, caller.name)
        positions: list[int] = []
        for i, op in enumerate(ops):
            try:
                await self.check(op, caller)
            except InvalidOperation as exc:
                results[i] = Rejection(exc.field, exc.reason, i)
                continue
            default = ids[i] if ids is not None else None
            ticket.ids.append(stored_id(caller, op.user_operation_id, default))
            ticket.ops.append(msgspec.structs.replace(op, api_key=None) if op.api_key else op)
            positions.append(i)
        if len(positions) < len(ops):
            metrics.rejected.labels(source).inc(len(ops) - len(positions))
        if ticket.ops:
            self._queue.append(ticket)
            self._wake.set()
            await ticket.done.wait()
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
        try:
            uuid.UUID(op_id)
        except ValueError:
            return None
        owner = None if caller is None or caller.admin else caller.name
        looker = caller.name if caller is not None else None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(queries.GET_OPERATION, op_id, owner, looker)
        if row is None:
            return None
        fields = dict(row)
        body = fields.pop("body")
        fields["status"] = Status(fields["status"])
        return OperationView(**fields, operation=operation_decoder.decode(body))

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
            while not self._queue:  # every committer waits on the same event
                if self._wake.is_set():
                    self._wake = anyio.Event()
                await self._wake.wait()
            tickets = self._take()
            with anyio.CancelScope(shield=True):
                await self._commit(tickets)

    def _take(self) -> list[_Ticket]:
        tickets: list[_Ticket] = []
        count = 0
        while self._queue and (not tickets or count + len(self._queue[0].ops) <= self.max_group):
            ticket = self._queue.popleft()
            tickets.append(ticket)
            count += len(ticket.ops)
        return tickets

    async def _commit(self, tickets: list[_Ticket]) -> None:
        try:
            created, refused = await self._store(tickets)
            await self._enqueue(tickets, created, refused)
            existing = await self._existing(tickets, created)
        except Exception as exc:
            error = translate(exc)
            log.warning("ingress.store_failed", error=str(error), operations=_count(tickets))
            for ticket in tickets:
                ticket.error = error
                ticket.done.set()
            return
        for t, ticket in enumerate(tickets):
            seen: set[str] = set()
            for j, (op_id, op) in enumerate(zip(ticket.ids, ticket.ops, strict=True)):
                rejection = refused.get((t, j))
                if rejection is not None:
                    ticket.results.append(rejection)
                    continue
                is_new = op_id in created and op_id not in seen
                seen.add(op_id)
                status, op_type = (
                    (Status.UNPROCESSED, op.operation_type)
                    if is_new
                    else existing.get(op_id, (Status.UNPROCESSED, op.operation_type))
                )
                ticket.results.append(Receipt(op_id, op_type, status, is_new))
            stored = sum(isinstance(r, Receipt) for r in ticket.results)
            metrics.received.labels(ticket.source).inc(stored)
            if stored < len(ticket.ops):
                metrics.rejected.labels(ticket.source).inc(len(ticket.ops) - stored)
            ticket.done.set()

    async def _store(self, tickets: list[_Ticket]) -> tuple[set[str], dict[_Place, Rejection]]:
        """Store every ticket's operations; the ids that were new, and the refused ones by
        (ticket, operation) position."""
        now = dt.datetime.now(dt.UTC)
        rows: list[_Row] = []
        refused: dict[_Place, Rejection] = {}
        for t, ticket in enumerate(tickets):
            for j, (op_id, op) in enumerate(zip(ticket.ids, ticket.ops, strict=True)):
                try:
                    body = json_encoder.encode(op).decode()
                    run_at = _run_at(op, now)
                except (ValueError, OverflowError, TypeError, msgspec.EncodeError) as exc:
                    refused[(t, j)] = Rejection("body", f"cannot be stored: {exc}")
                    continue
                values = (
                    op_id,
                    op.operation_type,
                    body,
                    op.priority,
                    run_at,
                    op.ordering_key,
                    ticket.source,
                    ticket.caller,
                )
                rows.append(((t, j), values))
        return await self._insert(rows, refused), refused

    async def _insert(self, rows: list[_Row], refused: dict[_Place, Rejection]) -> set[str]:
        """One INSERT for ``rows``; when PostgreSQL refuses their data, halves of them
        until each refused operation is alone (it lands in ``refused``)."""
        if not rows:
            return set()
        columns = [list(column) for column in zip(*(values for _, values in rows), strict=True)]
        try:
            async with self.pool.acquire() as conn:
                stored = await conn.fetch(queries.INSERT_OPERATIONS, *columns)
        except asyncpg.PostgresError as exc:
            if (exc.sqlstate or "")[:2] not in _DATA_SQLSTATE_CLASSES:
                raise
            if len(rows) == 1:
                place, values = rows[0]
                reason = f"cannot be stored: {translate(exc)}"
                log.warning("ingress.refused_by_store", id=values[0], reason=reason)
                refused[place] = Rejection("body", reason)
                return set()
            half = len(rows) // 2
            return await self._insert(rows[:half], refused) | await self._insert(
                rows[half:], refused
            )
        return {row[0] for row in stored}

    async def _enqueue(
        self, tickets: list[_Ticket], created: set[str], refused: dict[_Place, Rejection]
    ) -> None:
        """Append the new operations to the work stream; on failure the sweeper re-enqueues."""
        items, queued = [], set()
        for t, ticket in enumerate(tickets):
            for j, (op_id, op) in enumerate(zip(ticket.ids, ticket.ops, strict=True)):
                if op_id in created and op_id not in queued and (t, j) not in refused:
                    queued.add(op_id)
                    items.append(WorkOp(op_id, op))
        if not items:
            return
        entries = [
            {"ops": work_encoder.encode(items[i : i + self.chunk])}
            for i in range(0, len(items), self.chunk)
        ]
        try:
            await self.streams.add(self.streams.names.work, entries)
        except rs.CONNECTION_EXCEPTIONS as exc:
            log.warning(
                "ingress.enqueue_failed",
                error=str(exc),
                operations=len(items),
                next="stored; the sweeper re-enqueues them from PostgreSQL",
            )

    async def _existing(
        self, tickets: list[_Ticket], created: set[str]
    ) -> dict[str, tuple[Status, str]]:
        repeated = [i for t in tickets for i in t.ids if i not in created]
        if not repeated:
            return {}
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(queries.STATUS_OF, repeated)
        return {row[0]: (Status(row[2]), row[1]) for row in rows}


def _run_at(op: Operation, now: dt.datetime) -> dt.datetime | None:
    if op.run_at is not None:
        return op.run_at if op.run_at.tzinfo else op.run_at.replace(tzinfo=dt.UTC)
    if op.delay_ms is not None:
        return now + dt.timedelta(milliseconds=op.delay_ms)
    return None


# Errors about the values sent, not the server: data exceptions (a NUL in text, a time out
# of range; asyncpg reports values it cannot encode as these too), integrity violations,
# program limits. Any other error fails the whole group, as a transient one does.
_DATA_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})


def _count(tickets: list[_Ticket]) -> int:
    return sum(len(t.ops) for t in tickets)
