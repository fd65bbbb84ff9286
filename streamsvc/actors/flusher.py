"""Flusher: claim a batch from the work stream, apply it in ONE transaction, then ack.

Exactly once: the transaction first claims the batch's own BatchOperations rows that are
still pending (one UPDATE marking them SUCCESS), applies only those, and marks the refused
ones FAIL before the same commit. A redelivered or doubly-claimed entry therefore finds
its operations finished and applies nothing; it only re-reports them.

A statement that fails is searched inside the transaction until the bad operations stand
alone (inside PostgreSQL for the JSON-fed statements, see sql/apply_rows.sql); they end
as FAIL with the database's message while every good one still lands in the same batch.
Transient errors roll back and retry with backoff.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import structlog

from streamsvc import metrics, queries, sqlbuild
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import is_transient, translate
from streamsvc.backoff import pause
from streamsvc.catalog import Catalog
from streamsvc.errors import TransientError
from streamsvc.model import Outcome, Status, WorkOp, user_id, work_decoder, work_encoder
from streamsvc.policy import RetryPolicy, Verdict

log = structlog.get_logger("streamsvc.flusher")


@dataclass(slots=True)
class BatchResult:
    """What one transaction decided for each operation of the batch."""

    batch_id: str
    outcomes: list[Outcome] = field(default_factory=list)


class Flusher:
    def __init__(
        self,
        name: str,
        pool: asyncpg.Pool,
        streams: rs.Streams,
        catalog: Catalog,
        retry: RetryPolicy,
        *,
        limit: int,
        block_ms: int = 1000,
    ) -> None:
        self.name = name
        self.pool = pool
        self.streams = streams
        self.catalog = catalog
        self.retry = retry
        self.limit = limit
        self.block_ms = block_ms
        self.stopping = False
        self._ops_per_entry = 1.0

    # -- loop --------------------------------------------------------------------------
    async def run(self, *, burst: bool = False) -> None:
        """Claim and apply batches until stopped (or, in burst mode, until nothing waits)."""
        names = self.streams.names
        failures = 0
        while not self.stopping:
            count = max(1, min(self.limit, int(self.limit / self._ops_per_entry)))
            try:
                entries = await self.streams.read(
                    names.work,
                    rs.FLUSHER_GROUP,
                    self.name,
                    count=count,
                    block_ms=None if burst else self.block_ms,
                )
                if not entries:
                    if burst:
                        return
                    continue
                await self.handle(entries)
                failures = 0
            except rs.CONNECTION_EXCEPTIONS as exc:  # unacked work is redelivered later
                failures += 1
                await pause(
                    log, "flusher.redis_unavailable", exc, self.retry, failures, "reading again"
                )

    async def handle(self, entries: list[rs.Entry]) -> None:
        """Apply every operation of ``entries`` (in transactions of at most ``limit``), then
        report the outcomes and ack the entries in one Redis transaction."""
        items = await self._decode(entries)
        ops_count = len(items)
        self._ops_per_entry = 0.8 * self._ops_per_entry + 0.2 * max(1, ops_count / len(entries))
        metrics.in_flight.inc(ops_count)
        try:
            outcomes: list[Outcome] = []
            for start in range(0, len(items), self.limit):
                result = await self.flush(items[start : start + self.limit])
                if result is None:
                    return  # left unacked: the sweeper hands the entries out again
                outcomes.extend(result.outcomes)
            with anyio.CancelScope(shield=True):  # committed: the ack must not be cut off
                await self._report(entries, outcomes)
            _observe_latency(entries, len(items))
        finally:
            metrics.in_flight.dec(ops_count)

    async def _decode(self, entries: list[rs.Entry]) -> list[WorkOp]:
        """The operations of ``entries``; an entry that is not ours is dead-lettered."""
        items: list[WorkOp] = []
        for entry_id, fields in entries:
            try:
                items.extend(work_decoder.decode(fields[b"ops"]))
            except Exception as exc:
                reason = f"undecodable work entry: {exc}"
                log.error(
                    "flush.undecodable_entry",
                    entry=entry_id.decode(),
                    error=reason,
                    next="dead-lettered",
                )
                dead: dict[Any, Any] = {**fields, b"reason": reason.encode()}
                await self.streams.add(self.streams.names.dead, [dead])
        return items

    async def _report(self, entries: list[rs.Entry], outcomes: list[Outcome]) -> None:
        names = self.streams.names
        ids = [eid for eid, _ in entries]
        payload = [{"o": work_encoder.encode(outcomes)}] if outcomes else []
        await self.streams.ack_with(names.work, rs.FLUSHER_GROUP, ids, names.outcomes, payload)

    # -- one batch ---------------------------------------------------------------------
    async def flush(self, items: Sequence[WorkOp]) -> BatchResult | None:
        """Apply ``items`` exactly once, retrying transient errors; None means leave it."""
        attempt = 0
        trigger = "claim"
        while True:
            attempt += 1
            metrics.flushes.labels(trigger).inc()
            started = time.perf_counter()
            try:
                result = await self._transaction(items)
            except Exception as exc:
                error = translate(exc)
                decision = self.retry.decide(
                    transient=isinstance(error, TransientError),
                    attempt=attempt,
                    stopping=self.stopping,
                )
                log.warning(
                    "flush.failed",
                    error=str(error),
                    operations=len(items),
                    attempt=attempt,
                    next=decision.verdict.value,
                    delay_s=round(decision.delay_s, 3),
                )
                if decision.verdict is Verdict.RETRY:
                    metrics.retried.inc(len(items))
                    await self._count_attempt(items, str(error))
                    await anyio.sleep(decision.delay_s)
                    trigger = "retry"
                    continue
                if decision.verdict is Verdict.LEAVE:
                    return None
                return await self._fail_all(items, str(error))
            metrics.flush_seconds.observe(time.perf_counter() - started)
            metrics.flush_size.observe(len(items))
            return result

    async def _transaction(self, items: Sequence[WorkOp]) -> BatchResult:
        """One batch transaction: first with no savepoint around the statements applied
        from here, and when one of them fails, once more with them."""
        try:
            return await self._attempt(items, careful=False)
        except _Careful:
            return await self._attempt(items, careful=True)

    async def _attempt(self, items: Sequence[WorkOp], *, careful: bool) -> BatchResult:
        """One batch transaction (``careful``: see ``_apply``).

        Its first call claims the batch's pending rows (marking them SUCCESS), takes the
        table locks and, when the batch starts with statements PostgreSQL applies, applies
        those too; then the rest follows in order, each group in a subtransaction so a bad
        operation costs the search of its own group only. The few that failed are marked
        FAIL before the commit, by the batch's last call when PostgreSQL applies it.
        Statements are rendered before the transaction; when some operations had finished
        earlier, the first call applies nothing and the batch is planned again without
        them."""
        unique = list({item.id: item for item in items}.values())
        result = BatchResult(batch_id=str(uuid.uuid4()))
        prepared = self._prepare(unique)
        errors: dict[str, str] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            runs = _runs(prepared)
            lead = runs.pop(0)[1] if runs and runs[0][0] else []
            tables = sqlbuild.tables_of([g for g, _ in prepared], self.catalog)
            claim = ([i.id for i in unique], result.batch_id)
            attempts = await self._apply_in_postgres(
                conn, lead, errors, tables, claim=claim, mark=not runs
            )
            pending = [i for i in unique if i.id in attempts]
            if len(pending) < len(unique):  # some finished earlier: plan without them
                prepared = self._prepare(pending)
                earlier = [i.id for i in unique if i.id not in attempts]
                result.outcomes.extend(await self._earlier(conn, earlier, unique))
                runs = _runs(prepared)
                tables = sqlbuild.tables_of([g for g, _ in prepared], self.catalog)
            else:
                tables = []  # the first call took the locks
            for n, (in_postgres, run) in enumerate(runs):
                if in_postgres:  # the table locks go with the first round trip
                    last = n == len(runs) - 1
                    await self._apply_in_postgres(conn, run, errors, tables, mark=last)
                else:
                    if tables:
                        await conn.execute(queries.LOCK_TABLES, tables)
                    for group, statement in run:
                        await self._apply(conn, group, errors, statement, careful=careful)
                tables = []
            # A last call of PostgreSQL's marked them (so did the first, when it was last).
            if errors and runs and not runs[-1][0]:
                failed = list(errors)
                await conn.execute(queries.MARK_FAILED, failed, [errors[i] for i in failed])
        for item in pending:
            error = errors.get(item.id)
            result.outcomes.append(
                Outcome(
                    item.id,
                    item.op.operation_type,
                    Status.FAIL if error else Status.SUCCESS,
                    error,
                    attempts[item.id],
                    result.batch_id,
                    item.op.meta,
                    user_id(item.op),
                )
            )
        metrics.succeeded.inc(len(pending) - len(errors))
        metrics.failed.inc(len(errors))
        metrics.last_success.set_to_current_time()
        return result

    def _prepare(self, items: Sequence[WorkOp]) -> Prepared:
        """The groups of ``items`` with their statements (None: rendering failed, and
        ``_apply`` finds out for which members)."""
        prepared: Prepared = []
        for group in sqlbuild.plan(items, self.catalog):
            try:
                prepared.append((group, sqlbuild.render(group, self.catalog)))
            except Exception:
                prepared.append((group, None))
        return prepared

    async def _earlier(
        self, conn: asyncpg.Connection, ids: list[str], items: Sequence[WorkOp]
    ) -> list[Outcome]:
        """Operations finished by an earlier batch: reported again, applied never."""
        rows = await conn.fetch(queries.STATE_OF, ids)
        by_id = {i.id: i for i in items}
        unknown = len(ids) - len(rows)
        if unknown:
            log.warning("flush.unknown_operations", count=unknown, next="acked and dropped")
        return [
            Outcome(
                op_id,
                by_id[op_id].op.operation_type,
                Status(status),
                error,
                attempts,
                batch_id,
                by_id[op_id].op.meta,
                user_id(by_id[op_id].op),
            )
            for op_id, status, error, attempts, batch_id in rows
        ]

    async def _apply(
        self,
        conn: asyncpg.Connection,
        group: sqlbuild.Group,
        errors: dict[str, str],
        statement: sqlbuild.Statement | None = None,
        *,
        careful: bool,
    ) -> None:
        """Run one group here. ``careful``: under a savepoint, so that a permanent error
        halves the group until the bad members stand alone; a savepoint that succeeded is
        left open (the commit releases them all), a round trip fewer. Otherwise without
        one, betting that the group succeeds, as it nearly always does: when it fails the
        transaction is lost, and `_Careful` has the batch start again with savepoints.
        (JSON-fed groups go to ``_apply_in_postgres``; one whose statement could not be
        rendered comes here to find its bad members.)"""
        try:
            statement = statement or sqlbuild.render(group, self.catalog)
            if careful:
                await conn.execute(_SAVEPOINT)
            try:
                await _execute(conn, statement)
            except Exception:
                if careful:
                    await conn.execute(_ROLLBACK_TO_SAVEPOINT)
                raise
            return
        except Exception as exc:
            error = translate(exc)
            if isinstance(error, TransientError):
                raise error from exc
            if not careful:
                raise _Careful from exc
            if isinstance(exc, asyncpg.UndefinedColumnError | asyncpg.UndefinedTableError):
                await self.catalog.refresh(conn)
            if len(group.members) == 1:
                errors[group.members[0].id] = str(error)
                return
        first, second = group.split()
        await self._apply(conn, first, errors, careful=True)
        await self._apply(conn, second, errors, careful=True)

    async def _apply_in_postgres(
        self,
        conn: asyncpg.Connection,
        run: Prepared,
        errors: dict[str, str],
        tables: list[str],
        *,
        claim: tuple[list[str], str] | None = None,
        mark: bool = False,
    ) -> dict[str, int]:
        """Apply JSON-fed groups inside PostgreSQL, in one round trip (taking ``tables``'
        locks first): each statement in a subtransaction, searched there when it fails; the
        members it accepts are applied, the refused ones recorded in ``errors``. With
        ``claim`` (operation ids, batch id), those rows are claimed first for the batch, and
        nothing is applied unless every one of them was pending; returns the claimed rows'
        attempts by id. With ``mark``, every error so far is marked FAIL in the same call."""
        statements, rows = [], []
        for _, statement in run:
            assert statement is not None  # `_runs` sends only rendered ones here
            statements.append(statement.sql)
            rows.append(statement.args[0])
        ids = [",".join(m.id for m in group.members) for group, _ in run] if mark else None
        failed = list(errors) if mark else []
        claim_ids, batch_id = claim or (None, None)
        try:
            reply = await conn.fetch(
                queries.APPLY_BATCH,
                claim_ids,
                batch_id,
                tables,
                statements,
                rows,
                ids,
                failed,
                [errors[i] for i in failed],
            )
        except asyncpg.PostgresError as exc:
            # The call itself failed, not a row: the transaction is aborted, so the batch
            # must start again; refused rows never end up here.
            error = translate(exc)
            raise TransientError(f"applying the batch failed: {error}") from exc
        claimed: dict[str, int] = {}
        for op_id, attempts, index, position, state, message in reply:
            if op_id is not None:
                claimed[op_id] = attempts
            elif is_transient(state):
                raise TransientError(message)
            else:
                errors[run[index - 1][0].members[position - 1].id] = message
        if any(row[4] in _SCHEMA_CHANGED for row in reply):
            await self.catalog.refresh(conn)
        return claimed

    async def _count_attempt(self, items: Sequence[WorkOp], error: str) -> None:
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(queries.COUNT_ATTEMPT, [i.id for i in items], error)
        except Exception as exc:  # the database may be what is down; the count can wait
            log.info("flush.attempt_not_counted", error=str(translate(exc)))

    async def _fail_all(self, items: Sequence[WorkOp], error: str) -> BatchResult | None:
        """Give up on a batch: every still-pending operation ends FAIL with ``error``."""
        result = BatchResult(batch_id=str(uuid.uuid4()))
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(queries.FAIL_PENDING, [i.id for i in items], error)
        except Exception as exc:
            log.warning(
                "flush.fail_not_recorded",
                error=str(translate(exc)),
                next="left unacked for redelivery",
            )
            return None
        users = {i.id: user_id(i.op) for i in items}
        for op_id, op_type, attempts, meta in rows:
            result.outcomes.append(
                Outcome(op_id, op_type, Status.FAIL, error, attempts, None, meta, users.get(op_id))
            )
        metrics.failed.inc(len(rows))
        return result


_SCHEMA_CHANGED = ("42703", "42P01")  # undefined column, undefined table


class _Careful(Exception):
    """A group applied without a savepoint failed: the transaction is lost, and the batch
    must start again with savepoints."""


# One name for every group's savepoint: rolling back to it returns to the newest one.
_SAVEPOINT = "SAVEPOINT streamsvc_group"
_ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT streamsvc_group"


Prepared = list[tuple[sqlbuild.Group, sqlbuild.Statement | None]]


def _runs(prepared: Prepared) -> list[tuple[bool, Prepared]]:
    """``prepared`` cut, in order, into runs of groups that PostgreSQL applies in one call
    (those fed by one JSON parameter: True) and runs of groups applied from here (statement
    groups, executemany; and groups whose statement failed to render: False)."""
    runs: list[tuple[bool, Prepared]] = []
    for group, statement in prepared:
        in_postgres = statement is not None and statement.many is None
        if not runs or runs[-1][0] != in_postgres:
            runs.append((in_postgres, []))
        runs[-1][1].append((group, statement))
    return runs


async def _execute(conn: asyncpg.Connection, statement: sqlbuild.Statement) -> None:
    if statement.many is not None:
        await conn.executemany(statement.sql, statement.many)
    else:
        await conn.execute(statement.sql, *statement.args)


def _observe_latency(entries: list[rs.Entry], operations: int) -> None:
    """Submit-to-finish latency, from the time in the oldest entry's id (its XADD)."""
    now_ms = time.time() * 1000
    per_entry = max(1, operations // len(entries))
    for entry_id, _ in entries:
        seconds = max(0.0, now_ms - int(entry_id.split(b"-")[0])) / 1000
        for _ in range(per_entry):
            metrics.latency_seconds.observe(seconds)
