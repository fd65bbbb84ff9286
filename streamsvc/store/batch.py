"""One batch transaction on one connection: claim, apply, mark, and release keys.

Exactly once: the transaction first claims the batch's own BatchOperations rows that may
be applied now (one UPDATE marking them SUCCESS: pending, not parked behind their key,
not held for a runAt), applies only those, and marks the refused ones FAIL before the same
commit. A redelivered or doubly-claimed entry therefore finds its operations finished and
applies nothing; it only re-reports them.

A statement that fails is searched inside the transaction until the bad operations stand
alone (inside PostgreSQL, see sql/apply_rows.sql); they end as FAIL with the database's
message while every good one still lands in the same batch. Every statement runs there as
the caller role (streamsvc.adapters.caller_role), and a connection that ran callers'
statements is cleaned before it goes back to the pool. When claimed operations carry an
orderingKey, the next operation of each key is released in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import anyio
import asyncpg
import msgspec
import structlog

from streamsvc import sqlbuild
from streamsvc.adapters.postgres import (
    LOCK_NOT_AVAILABLE,
    LockWait,
    StatementTimeout,
    is_transient,
    translate,
)
from streamsvc.catalog import Catalog
from streamsvc.errors import TransientError
from streamsvc.model import BodyKind, Outcome, Status, WorkOp, operation_decoder, user_id
from streamsvc.store.queries import QUERIES
from streamsvc.store.records import Applied, State

log = structlog.get_logger("streamsvc.store")

_APPLY_BATCH = QUERIES["apply_batch"]
_LOCK_TABLES = QUERIES["lock_tables"]
_MARK_FAILED = QUERIES["mark_failed"]
_NOT_CLAIMED = QUERIES["not_claimed"]
_RELEASE_KEYS = QUERIES["release_keys"]
_CLEAN_SESSION = QUERIES["clean_session"]
_SCHEMA_CHANGED = ("42703", "42P01")  # undefined column, undefined table
_CLEAN_TIMEOUT_S = 5.0

Prepared = list[tuple[sqlbuild.Group, sqlbuild.Statement | None]]


async def apply(
    pool: asyncpg.Pool, catalog: Catalog, items: Sequence[WorkOp], *, batch_id: str | None = None
) -> Applied:
    """One batch transaction over ``items`` (see the module's docstring), the batch
    ``batch_id`` (a new one if None).

    Its first call claims the batch's rows (marking them SUCCESS), takes the table locks
    and applies the statements, in order, each in a subtransaction so a bad operation
    costs the search of its own group only; the few that failed are marked FAIL in the
    same call. Statements are rendered before the transaction; when some operations could
    not be claimed, the first call applies nothing and the batch is planned again without
    them. (A group whose statement could not be rendered makes the batch take more calls,
    see ``_apply_unrendered``.)"""
    unique = list({item.id: item for item in items}.values())
    batch = _Batch(catalog, Applied(batch_id=batch_id or str(uuid.uuid4())))
    prepared = batch.prepare(unique)
    callers_sql = any(i.op.kind is not BodyKind.STRUCTURED for i in unique)
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                pending, attempts = await batch.apply_all(conn, unique, prepared)
                keyed = [i.id for i in pending if i.op.ordering_key is not None]
                batch.result.released = await release(conn, keyed)
        finally:
            if callers_sql:
                await _clean_session(conn)
    for item in pending:
        error = batch.errors.get(item.id)
        batch.result.outcomes.append(
            Outcome(
                id=item.id,
                operation_type=item.op.operation_type,
                status=Status.FAIL if error else Status.SUCCESS,
                error=error,
                attempts=attempts[item.id],
                batch_id=batch.result.batch_id,
                meta=item.op.meta,
                user_operation_id=user_id(item.op),
                traceparent=item.op.traceparent,
            )
        )
    return batch.result


class _Batch:
    """The calls of one transaction, and what they found so far."""

    def __init__(self, catalog: Catalog, result: Applied) -> None:
        self.catalog = catalog
        self.result = result
        self.errors: dict[str, str] = {}

    def prepare(self, items: Sequence[WorkOp]) -> Prepared:
        """The groups of ``items`` with their statements (None: rendering failed, and
        ``_apply_unrendered`` finds out for which members)."""
        prepared: Prepared = []
        for group in sqlbuild.plan(items, self.catalog):
            try:
                prepared.append((group, sqlbuild.render(group, self.catalog)))
            except Exception:
                prepared.append((group, None))
        return prepared

    async def apply_all(
        self, conn: asyncpg.Connection, unique: list[WorkOp], prepared: Prepared
    ) -> tuple[list[WorkOp], dict[str, int]]:
        """The calls of the transaction; the claimed operations and their attempts."""
        runs = _runs(prepared)
        lead = runs.pop(0)[1] if runs and runs[0][0] else []
        tables = sqlbuild.tables_of([g for g, _ in prepared], self.catalog)
        claim = ([i.id for i in unique], self.result.batch_id)
        attempts = await self.apply_in_postgres(conn, lead, tables, claim=claim, mark=not runs)
        pending = [i for i in unique if i.id in attempts]
        if len(pending) < len(unique):  # some could not be claimed: plan without them
            prepared = self.prepare(pending)
            others = [i for i in unique if i.id not in attempts]
            self.result.earlier.extend(await _not_claimed(conn, others))
            runs = _runs(prepared)
            tables = sqlbuild.tables_of([g for g, _ in prepared], self.catalog)
        else:
            tables = []  # the first call took the locks
        for n, (rendered, run) in enumerate(runs):
            if rendered:  # the table locks go with the first round trip
                last = n == len(runs) - 1
                await self.apply_in_postgres(conn, run, tables, mark=last)
            else:
                if tables:
                    await conn.execute(_LOCK_TABLES, tables)
                for group, _ in run:
                    await self.apply_unrendered(conn, group)
            tables = []
        # A last call of PostgreSQL's marked them (so did the first, when it was last).
        if self.errors and runs and not runs[-1][0]:
            failed = list(self.errors)
            await conn.execute(_MARK_FAILED, failed, [self.errors[i] for i in failed])
        return pending, attempts

    async def apply_unrendered(self, conn: asyncpg.Connection, group: sqlbuild.Group) -> None:
        """A group whose statement could not be rendered (a column or table gone from the
        catalog, a text the scanner cannot read): halved until the members at fault stand
        alone, each refused with the reason; the halves that render are applied."""
        try:
            statement = sqlbuild.render(group, self.catalog)
        except Exception as exc:
            if len(group.members) == 1:
                self.errors[group.members[0].id] = str(translate(exc))
                return
            for half in group.split():
                await self.apply_unrendered(conn, half)
            return
        await self.apply_in_postgres(conn, [(group, statement)], [])

    async def apply_in_postgres(
        self,
        conn: asyncpg.Connection,
        run: Prepared,
        tables: list[str],
        *,
        claim: tuple[list[str], str] | None = None,
        mark: bool = False,
    ) -> dict[str, int]:
        """Apply JSON-fed groups inside PostgreSQL, in one round trip (taking ``tables``'
        locks first): each statement in a subtransaction, searched there when it fails; the
        members it accepts are applied, the refused ones recorded in ``errors``. With
        ``claim`` (operation ids, batch id), those rows are claimed first for the batch, and
        nothing is applied unless every one of them could be; returns the claimed rows'
        attempts by id. With ``mark``, every error so far is marked FAIL in the same call."""
        statements, rows, each = [], [], []
        for _, statement in run:
            assert statement is not None  # `_runs` sends only rendered ones here
            statements.append(statement.sql)
            rows.append(statement.rows)
            each.append(statement.each)
        ids = [",".join(m.id for m in group.members) for group, _ in run] if mark else None
        failed = list(self.errors) if mark else []
        claim_ids, batch_id = claim or (None, None)
        try:
            reply = await conn.fetch(
                _APPLY_BATCH,
                claim_ids,
                batch_id,
                tables,
                statements,
                rows,
                each,
                ids,
                failed,
                [self.errors[i] for i in failed],
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
                self.errors[run[index - 1][0].members[position - 1].id] = message
        if any(row[4] in _SCHEMA_CHANGED for row in reply):
            await self.catalog.refresh(conn)
        return claimed


async def _not_claimed(conn: asyncpg.Connection, items: Sequence[WorkOp]) -> list[Outcome]:
    """Operations the claim left alone: those finished earlier are reported again (not
    those cancelled: the cancel announced them), and those held back are left to their
    scheduler or their key's turn."""
    by_id = {i.id: i for i in items}
    rows = await conn.fetch(_NOT_CLAIMED, list(by_id))
    states = [msgspec.convert(dict(row), State) for row in rows]
    return [
        Outcome(
            id=s.id,
            operation_type=by_id[s.id].op.operation_type,
            status=s.status,
            error=s.error,
            attempts=s.attempts,
            batch_id=s.batch_id,
            meta=by_id[s.id].op.meta,
            user_operation_id=user_id(by_id[s.id].op),
            traceparent=by_id[s.id].op.traceparent,
        )
        for s in states
        if s.status is not Status.CANCELLED
    ]


async def release(conn: asyncpg.Connection, ids: Sequence[str]) -> list[WorkOp]:
    """For the key of each of the operations ``ids`` (which carry one), the next operation
    whose turn came (its earlier one finished), taken out of the parked ones; those due now
    are returned, to put on a work stream."""
    if not ids:
        return []
    rows = await conn.fetch(_RELEASE_KEYS, list(ids))
    return [work_of(row) for row in rows]


def work_of(row: asyncpg.Record) -> WorkOp:
    """A row's id and stored body (columns ``id``, ``body``) as the work streams carry it."""
    return WorkOp(row["id"], operation_decoder.decode(row["body"]))


Run = tuple[bool, Prepared]


def _runs(prepared: Prepared) -> list[Run]:
    """``prepared`` cut, in order, into runs of rendered groups, which PostgreSQL applies in
    one call (True), and runs of groups whose statement failed to render (False)."""
    runs: list[Run] = []
    for group, statement in prepared:
        rendered = statement is not None
        if not runs or runs[-1][0] != rendered:
            runs.append((rendered, []))
        runs[-1][1].append((group, statement))
    return runs


async def _clean_session(conn: asyncpg.Connection) -> None:
    """After a batch that ran callers' statements, whether it committed or not: what they
    can leave on the session goes (queries.sql: clean_session). A connection that cannot be
    cleaned is closed rather than handed to the next user."""
    with anyio.move_on_after(_CLEAN_TIMEOUT_S, shield=True):
        try:
            await conn.execute(_CLEAN_SESSION)
            return
        except Exception as exc:
            log.warning("flush.session_not_cleaned", error=str(exc), next="closing it")
    conn.terminate()
