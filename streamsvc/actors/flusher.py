"""Flusher: claim a batch from the work stream, apply it in ONE transaction, then ack.

Exactly once: the transaction first claims the batch's own BatchOperations rows that are
still pending (one UPDATE marking them SUCCESS), applies only those, and marks the refused
ones FAIL before the same commit. A redelivered or doubly-claimed entry therefore finds
its operations finished and applies nothing; it only re-reports them.

A statement that fails is searched inside the transaction until the bad operations stand
alone (inside PostgreSQL, see sql/apply_rows.sql); they end as FAIL with the database's
message while every good one still lands in the same batch. Every statement runs there as
the caller role (streamsvc.adapters.caller_role), and a connection that ran callers'
statements is cleaned before it goes back to the pool. Transient errors roll back and
retry with backoff; a batch that hits the statement timeout twice is cut in halves, each
its own transaction, until the slow operation fails alone (streamsvc.policy). A batch that
only waited for a lock (its tables', or rows another transaction holds) is retried until
the lock is free, without counting it as an attempt: waiting is nobody's fault here.
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
from streamsvc.adapters.postgres import (
    LOCK_NOT_AVAILABLE,
    LockWait,
    StatementTimeout,
    is_transient,
    translate,
)
from streamsvc.backoff import pause
from streamsvc.catalog import Catalog
from streamsvc.errors import TransientError
from streamsvc.model import (
    BodyKind,
    Outcome,
    Status,
    WorkOp,
    user_id,
    work_decoder,
    work_encoder,
)
from streamsvc.policy import RetryPolicy, Verdict, halves

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
        keep_claimed_s: float = 10.0,
    ) -> None:
        self.name = name
        self.pool = pool
        self.streams = streams
        self.catalog = catalog
        self.retry = retry
        self.limit = limit
        self.block_ms = block_ms
        self.keep_claimed_s = keep_claimed_s  # well under the sweeper's claim-idle time
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
            async with anyio.create_task_group() as keeping:
                keeping.start_soon(self._keep_claimed, [eid for eid, _ in entries])
                outcomes = await self._flush_all(items)
                keeping.cancel_scope.cancel()
            if outcomes is None:
                return  # left unacked: the sweeper hands the entries out again
            with anyio.CancelScope(shield=True):  # committed: the ack must not be cut off
                await self._report(entries, outcomes)
            _observe_latency(entries, len(items))
        finally:
            metrics.in_flight.dec(ops_count)

    async def _flush_all(self, items: list[WorkOp]) -> list[Outcome] | None:
        """Every operation of ``items``, in transactions of at most ``limit``; None when a
        transaction is left to be tried again later."""
        outcomes: list[Outcome] = []
        for start in range(0, len(items), self.limit):
            result = await self.flush(items[start : start + self.limit])
            if result is None:
                return None
            outcomes.extend(result.outcomes)
        return outcomes

    async def _keep_claimed(self, ids: list[bytes]) -> None:
        """While a batch takes long (waiting for a table another batch holds, retrying,
        being cut), keep its entries marked as ours: the sweeper hands out only entries
        idle for longer than its claim-idle time, as a dead flusher's are."""
        while True:
            await anyio.sleep(self.keep_claimed_s)
            try:
                with anyio.CancelScope(shield=True):  # a command cut off would lose its reply
                    await self.streams.keep(
                        self.streams.names.work, rs.FLUSHER_GROUP, self.name, ids
                    )
            except rs.CONNECTION_EXCEPTIONS as exc:
                log.warning(
                    "flush.keep_claimed_failed",
                    error=str(exc),
                    next=f"trying again in {self.keep_claimed_s} s",
                )

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
    async def flush(self, items: Sequence[WorkOp], *, timeouts: int = 0) -> BatchResult | None:
        """Apply ``items`` exactly once, retrying transient errors; None means leave it.
        ``timeouts``: statement timeouts met already by the batch ``items`` were cut from.
        Lock waits that ran out are retried apart from ``attempt``: they count in
        ``lock_waits`` (for the backoff) only, and are not counted on the rows either."""
        attempt = 0
        lock_waits = 0
        trigger = "claim"
        while True:
            attempt += 1
            metrics.flushes.labels(trigger).inc()
            started = time.perf_counter()
            try:
                result = await self._attempt(items)
            except Exception as exc:
                error = translate(exc)
                timed_out = isinstance(error, StatementTimeout)
                timeouts += timed_out
                waited = isinstance(error, LockWait)
                attempt -= waited  # not the operations' fault: not an attempt of theirs
                lock_waits = lock_waits + 1 if waited else 0
                decision = self.retry.decide(
                    transient=isinstance(error, TransientError),
                    attempt=attempt,
                    stopping=self.stopping,
                    timeouts=timeouts if timed_out else 0,
                    operations=len(items),
                    lock_waits=lock_waits,
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
                    if not waited:
                        await self._count_attempt(items, str(error))
                    await anyio.sleep(decision.delay_s)
                    trigger = "retry"
                    continue
                if decision.verdict is Verdict.SPLIT:
                    return await self._split(items, timeouts)
                if decision.verdict is Verdict.LEAVE:
                    return None
                return await self._fail_all(items, str(error))
            metrics.flush_seconds.observe(time.perf_counter() - started)
            metrics.flush_size.observe(len(items))
            return result

    async def _split(self, items: Sequence[WorkOp], timeouts: int) -> BatchResult | None:
        """Apply the halves of ``items`` one after the other, each in its own transactions
        (cut further while they time out), so the operations at fault end up alone."""
        first, _ = halves(len(items))
        result = BatchResult(batch_id=str(uuid.uuid4()))
        for part in (items[:first], items[first:]):
            done = await self.flush(part, timeouts=timeouts)
            if done is None:
                return None  # left unacked: what committed is only reported again
            result.outcomes.extend(done.outcomes)
        return result

    async def _attempt(self, items: Sequence[WorkOp]) -> BatchResult:
        """One batch transaction.

        Its first call claims the batch's pending rows (marking them SUCCESS), takes the
        table locks and applies the statements, in order, each in a subtransaction so a bad
        operation costs the search of its own group only; the few that failed are marked
        FAIL in the same call. Statements are rendered before the transaction; when some
        operations had finished earlier, the first call applies nothing and the batch is
        planned again without them. (A group whose statement could not be rendered makes
        the batch take more calls, see ``_apply_unrendered``.)"""
        unique = list({item.id: item for item in items}.values())
        result = BatchResult(batch_id=str(uuid.uuid4()))
        prepared = self._prepare(unique)
        errors: dict[str, str] = {}
        callers_sql = any(i.op.kind is not BodyKind.STRUCTURED for i in unique)
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    pending, attempts = await self._apply_all(
                        conn, unique, prepared, errors, result
                    )
            finally:
                if callers_sql:
                    await _clean_session(conn)
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

    async def _apply_all(
        self,
        conn: asyncpg.Connection,
        unique: list[WorkOp],
        prepared: Prepared,
        errors: dict[str, str],
        result: BatchResult,
    ) -> tuple[list[WorkOp], dict[str, int]]:
        """The calls of ``_attempt``'s transaction; the claimed operations and attempts."""
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
        for n, (rendered, run) in enumerate(runs):
            if rendered:  # the table locks go with the first round trip
                last = n == len(runs) - 1
                await self._apply_in_postgres(conn, run, errors, tables, mark=last)
            else:
                if tables:
                    await conn.execute(queries.LOCK_TABLES, tables)
                for group, _ in run:
                    await self._apply_unrendered(conn, group, errors)
            tables = []
        # A last call of PostgreSQL's marked them (so did the first, when it was last).
        if errors and runs and not runs[-1][0]:
            failed = list(errors)
            await conn.execute(queries.MARK_FAILED, failed, [errors[i] for i in failed])
        return pending, attempts

    def _prepare(self, items: Sequence[WorkOp]) -> Prepared:
        """The groups of ``items`` with their statements (None: rendering failed, and
        ``_apply_unrendered`` finds out for which members)."""
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

    async def _apply_unrendered(
        self, conn: asyncpg.Connection, group: sqlbuild.Group, errors: dict[str, str]
    ) -> None:
        """A group whose statement could not be rendered (a column or table gone from the
        catalog, a text the scanner cannot read): halved until the members at fault stand
        alone, each refused with the reason; the halves that render are applied."""
        try:
            statement = sqlbuild.render(group, self.catalog)
        except Exception as exc:
            if len(group.members) == 1:
                errors[group.members[0].id] = str(translate(exc))
                return
            for half in group.split():
                await self._apply_unrendered(conn, half, errors)
            return
        await self._apply_in_postgres(conn, [(group, statement)], errors, [])

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
        statements, rows, each = [], [], []
        for _, statement in run:
            assert statement is not None  # `_runs` sends only rendered ones here
            statements.append(statement.sql)
            rows.append(statement.rows)
            each.append(statement.each)
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
                each,
                ids,
                failed,
                [errors[i] for i in failed],
            )
        except asyncpg.PostgresError as exc:
            # The call itself failed, not a row: the transaction is aborted, so the batch
            # must start again; refused rows never end up here.
            error = translate(exc)
            if isinstance(error, StatementTimeout | LockWait):
                raise error from exc
            raise TransientError(f"applying the batch failed: {error}") from exc
        claimed: dict[str, int] = {}
        for op_id, attempts, index, position, state, message in reply:
            if op_id is not None:
                claimed[op_id] = attempts
            elif state == LOCK_NOT_AVAILABLE:  # sql/apply_rows.sql raises these instead
                raise LockWait(f"lock wait: {message}")
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


Prepared = list[tuple[sqlbuild.Group, sqlbuild.Statement | None]]


def _runs(prepared: Prepared) -> list[tuple[bool, Prepared]]:
    """``prepared`` cut, in order, into runs of rendered groups, which PostgreSQL applies in
    one call (True), and runs of groups whose statement failed to render (False)."""
    runs: list[tuple[bool, Prepared]] = []
    for group, statement in prepared:
        rendered = statement is not None
        if not runs or runs[-1][0] != rendered:
            runs.append((rendered, []))
        runs[-1][1].append((group, statement))
    return runs


async def _clean_session(conn: asyncpg.Connection) -> None:
    """After a batch that ran callers' statements, whether it committed or not: what they
    can leave on the session goes (queries.CLEAN_SESSION). A connection that cannot be
    cleaned is closed rather than handed to the next user."""
    with anyio.move_on_after(_CLEAN_TIMEOUT_S, shield=True):
        try:
            await conn.execute(queries.CLEAN_SESSION)
            return
        except Exception as exc:
            log.warning("flush.session_not_cleaned", error=str(exc), next="closing it")
    conn.terminate()


_CLEAN_TIMEOUT_S = 5.0


def _observe_latency(entries: list[rs.Entry], operations: int) -> None:
    """Submit-to-finish latency, from the time in the oldest entry's id (its XADD)."""
    now_ms = time.time() * 1000
    per_entry = max(1, operations // len(entries))
    for entry_id, _ in entries:
        seconds = max(0.0, now_ms - int(entry_id.split(b"-")[0])) / 1000
        for _ in range(per_entry):
            metrics.latency_seconds.observe(seconds)
