"""The store on PostgreSQL: each method one named query of sql/queries.sql, or one short
transaction of them; the batch transaction is streamsvc.store.batch."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
import structlog

from streamsvc.adapters.postgres import translate
from streamsvc.catalog import Catalog
from streamsvc.model import (
    ListQuery,
    OperationCounts,
    OperationPage,
    OperationView,
    Outcome,
    Status,
    WorkOp,
    history_decoder,
    json_encoder,
    operation_decoder,
)
from streamsvc.store import batch, listing
from streamsvc.store.queries import QUERIES
from streamsvc.store.records import (
    Announced,
    Applied,
    Cancelled,
    Due,
    Ended,
    Failure,
    Intake,
    Minute,
    NewOperation,
    PausedType,
    Replayed,
    Retried,
    Selection,
    State,
    Summary,
    decode_cursor,
    encode_cursor,
)

log = structlog.get_logger("streamsvc.store")


# Errors about the values sent, not the server: data exceptions (a NUL in text, a time out
# of range; asyncpg reports values it cannot encode as these too), integrity violations,
# program limits. Any other error fails the whole group, as a transient one does.
_DATA_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})

# How long a retention batch may wait for a lock before it gives up (LockWait) and leaves
# its rows to the next cycle: deleting old rows is never worth holding anyone up.
EXPIRE_LOCK_WAIT_MS = 50


class PgStore:
    def __init__(self, pool: asyncpg.Pool, catalog: Catalog) -> None:
        self.pool = pool
        self.catalog = catalog

    # -- intake ------------------------------------------------------------------------
    async def intake(self, rows: Sequence[NewOperation]) -> Intake:
        result = Intake(created=set(), refused={}, ready=[])
        values: list[tuple[int, tuple[Any, ...]]] = []
        for n, row in enumerate(rows):
            try:
                body = json_encoder.encode(row.op).decode()
            except (ValueError, OverflowError, TypeError, msgspec.EncodeError) as exc:
                result.refused[n] = f"cannot be stored: {exc}"
                continue
            op = row.op
            values.append(
                (
                    n,
                    (
                        row.id,
                        op.operation_type,
                        body,
                        op.priority,
                        row.run_at,
                        op.ordering_key,
                        row.source,
                        row.submitted_by,
                    ),
                )
            )
        ready: dict[str, WorkOp | None] = {}
        await self._insert(values, result, ready)
        by_id = {row.id: row.op for row in rows}
        for op_id, work in ready.items():
            if work is None:
                work = WorkOp(op_id, by_id[op_id])
            result.ready.append(work)
        return result

    async def _insert(
        self,
        values: list[tuple[int, tuple[Any, ...]]],
        result: Intake,
        ready: dict[str, WorkOp | None],
    ) -> None:
        """One call for ``values``; when PostgreSQL refuses their data, halves of them until
        each refused operation is alone."""
        if not values:
            return
        columns = [list(column) for column in zip(*(v for _, v in values), strict=True)]
        try:
            async with self.pool.acquire() as conn:
                stored = await conn.fetch(QUERIES["intake"], *columns)
        except asyncpg.PostgresError as exc:
            if (exc.sqlstate or "")[:2] not in _DATA_SQLSTATE_CLASSES:
                raise
            if len(values) == 1:
                n, row = values[0]
                reason = f"cannot be stored: {translate(exc)}"
                log.warning("ingress.refused_by_store", id=row[0], reason=reason)
                result.refused[n] = reason
                return
            half = len(values) // 2
            await self._insert(values[:half], result, ready)
            await self._insert(values[half:], result, ready)
            return
        for row in stored:
            op_id = row["id"]
            if row["created"]:
                result.created.add(op_id)
            if row["ready"]:
                ready[op_id] = batch.work_of(row) if row["body"] is not None else None

    async def states(self, ids: Sequence[str]) -> dict[str, State]:
        if not ids:
            return {}
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["states"], list(ids))
        return {row["id"]: _state(row) for row in rows}

    async def get(
        self, op_id: str, *, owner: str | None, looker: str | None
    ) -> OperationView | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["get_operation"], op_id, owner, looker)
        return None if row is None else _view(row)

    async def list_operations(self, query: ListQuery, *, owner: str | None) -> OperationPage:
        after = decode_cursor(query.cursor, owner) if query.cursor else None
        given = listing.filters(query, owner)
        statement = listing.page_statement(tuple(column for column, _ in given))
        page = listing.bounds(query, after)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(statement, *listing.arguments(query, page, given))
        items = [_view(row) for row in rows[: query.limit]]
        last = items[-1] if len(rows) > query.limit else None
        cursor = encode_cursor(last.created_at, last.id, owner) if last else None
        return OperationPage(items, cursor)

    # -- flushing ----------------------------------------------------------------------
    async def apply(self, items: Sequence[WorkOp], *, batch_id: str | None = None) -> Applied:
        return await batch.apply(self.pool, self.catalog, items, batch_id=batch_id)

    async def count_attempt(self, ids: Sequence[str], error: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["count_attempt"], list(ids), error)

    async def fail_pending(self, ids: Sequence[str], error: str) -> Ended:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(QUERIES["fail_pending"], list(ids), error)
            released = await batch.release(conn, [r["id"] for r in rows if r["keyed"]])
        outcomes = [_ended(row, Status.FAIL, error) for row in rows]
        return Ended(outcomes=outcomes, released=released)

    # -- sweeping and scheduling ----------------------------------------------------------
    async def touch_pending(self, ids: Sequence[str]) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["touch_pending"], list(ids))

    async def stale(self, before: dt.datetime, limit: int) -> list[WorkOp]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["stale"], before, limit)
        return [batch.work_of(row) for row in rows]

    async def due(self, within_s: float, limit: int) -> list[Due]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["due"], within_s, limit)
        return [Due(batch.work_of(r), r["wait_s"]) for r in rows]

    async def hold_again(self, ids: Sequence[str]) -> None:
        if ids:
            async with self.pool.acquire() as conn:
                await conn.execute(QUERIES["hold_again"], list(ids))

    # -- callers' requests ---------------------------------------------------------------
    async def cancel(self, op_id: str, *, owner: str | None, looker: str | None) -> Cancelled:
        """The cancel commits first; the next operation of its key, if its turn came, is
        released after, in a transaction of its own: a release holds the key's lock while
        it takes the next row, so holding that row while waiting for the key could
        deadlock. Should a crash come between the two, the sweeper releases the key
        (``release_stuck``)."""
        async with self.pool.acquire() as conn:
            found = await conn.fetchrow(QUERIES["find"], op_id, owner, looker)
            if found is None:
                return Cancelled("unknown")
            row = await conn.fetchrow(QUERIES["cancel"], found["id"])
            if row is None:
                state = _state((await conn.fetch(QUERIES["states"], [found["id"]]))[0])
                if state.status is Status.CANCELLED:
                    return Cancelled("cancelled")
                return Cancelled("finished")
            released = await batch.release(conn, [row["id"]] if row["keyed"] else [])
        outcome = _ended(row, Status.CANCELLED, None)
        return Cancelled("cancelled", outcome=outcome, released=released)

    # -- queue management ------------------------------------------------------------------
    async def replay(self, ids: Sequence[str]) -> Replayed:
        async with self.pool.acquire() as conn:  # one statement: its own transaction
            rows = await conn.fetch(QUERIES["replay"], list(ids))
        return _replayed(rows)

    async def retry(self, op_id: str, *, owner: str | None, looker: str | None) -> Retried:
        async with self.pool.acquire() as conn:
            found = await conn.fetchrow(QUERIES["find"], op_id, owner, looker)
            if found is None:
                return Retried("unknown")
            replayed = _replayed(await conn.fetch(QUERIES["replay"], [found["id"]]))
            # As the replay left it, read before a flusher can take it.
            view = _view(await conn.fetchrow(QUERIES["get_operation"], found["id"], None, None))
        if replayed.ids:
            return Retried("replayed", view=view, ready=replayed.ready)
        return Retried("succeeded" if view.status is Status.SUCCESS else "pending", view=view)

    async def replayable(self, selection: Selection, limit: int) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["replayable"], *_selected(selection), limit)
        return [row["id"] for row in rows]

    async def count_replayable(self, selection: Selection) -> int:
        async with self.pool.acquire() as conn:
            count: int = await conn.fetchval(QUERIES["count_replayable"], *_selected(selection))
        return count

    async def pause(self, operation_type: str, *, by: str) -> dt.datetime:
        async with self.pool.acquire() as conn:
            paused_at: dt.datetime = await conn.fetchval(QUERIES["pause"], operation_type, by)
        return paused_at

    async def resume(self, operation_type: str) -> bool:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(QUERIES["resume"], operation_type) is not None

    async def paused_types(self) -> list[PausedType]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["paused_types"])
        return [PausedType(**dict(row)) for row in rows]

    async def unpause(self, operation_type: str | None, limit: int) -> list[WorkOp]:
        async with self.pool.acquire() as conn:
            if operation_type is None:
                rows = await conn.fetch(QUERIES["stray_paused"], limit)
            else:
                rows = await conn.fetch(QUERIES["unpause"], operation_type, limit)
        return [batch.work_of(row) for row in sorted(rows, key=lambda r: r["key_seq"])]

    async def release_stuck(self, limit: int) -> list[WorkOp]:
        async with self.pool.acquire() as conn:
            heads = [row[0] for row in await conn.fetch(QUERIES["stuck_keys"], limit)]
            return await batch.release(conn, heads)

    async def summary(self, *, failures: int, window_s: int) -> Summary:
        async with self.pool.acquire() as conn:
            counts = await conn.fetch(QUERIES["status_counts"])
            finished = await conn.fetchval(QUERIES["finished_since"], window_s)
            recent = await conn.fetch(QUERIES["recent_failures"], failures)
        return Summary(
            statuses={row["status"]: row["count"] for row in counts},
            finished_per_s=finished / window_s,
            failures=[Failure(**dict(row)) for row in recent],
        )

    # -- recurring operations --------------------------------------------------------------
    async def last_ticks(self) -> dict[str, dt.datetime]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["last_ticks"])
        return {row["name"]: row["last_tick"] for row in rows}

    async def record_tick(self, name: str, tick: dt.datetime) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["record_tick"], name, tick)

    # -- counts ---------------------------------------------------------------------------
    async def counts(
        self, since: dt.datetime, until: dt.datetime, *, owner: str | None
    ) -> OperationCounts:
        mine = () if owner is None else (owner,)
        suffix = "" if owner is None else "_of"
        # One snapshot, so the two agree while operations are stored and finished.
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            statuses = await conn.fetch(QUERIES[f"count_statuses{suffix}"], since, until, *mine)
            types = await conn.fetch(QUERIES[f"count_types{suffix}"], since, until, *mine)
        by_status = {status.value: 0 for status in Status}
        by_status.update((row["status"], row["count"]) for row in statuses)
        by_type: dict[str, dict[str, int]] = {}
        for row in types:
            by_type.setdefault(row["operation_type"], {})[row["status"]] = row["count"]
        return OperationCounts(since, until, by_status, by_type)

    async def throughput(self, minutes: int) -> list[Minute]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["throughput"], minutes)
        return [Minute(row["start"], row["finished"]) for row in rows]

    # -- retention -------------------------------------------------------------------------
    # -- announcements -----------------------------------------------------------------
    async def announced(self) -> Announced | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["announced"])
        return None if row is None else Announced(row["before"], row["seen"])

    async def mark_announced(self, point: Announced) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(QUERIES["mark_announced"], point.before, point.seen)

    async def outcomes_since(
        self, since: dt.datetime, after: str | None, until: dt.datetime | None, limit: int
    ) -> list[tuple[dt.datetime, Outcome]]:
        after = after or "00000000-0000-0000-0000-000000000000"
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["outcomes_since"], since, after, limit, until)
        return [(row["processed_at"], _finished(row)) for row in rows]

    async def expire(self, older_than_s: float, limit: int) -> int:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(QUERIES["expire_lock_timeout"], str(EXPIRE_LOCK_WAIT_MS))
                return int(await conn.fetchval(QUERIES["expire"], older_than_s, limit))
        except asyncpg.PostgresError as exc:
            raise translate(exc) from exc


def _view(row: asyncpg.Record) -> OperationView:
    fields = dict(row)
    body = fields.pop("body")
    fields["status"] = Status(fields["status"])
    fields["history"] = history_decoder.decode(fields["history"])
    return OperationView(**fields, operation=operation_decoder.decode(body))


def _replayed(rows: Sequence[asyncpg.Record]) -> Replayed:
    """streamsvc_replay's rows: an id twice when its key released it after storing it."""
    replayed = Replayed(ids=list(dict.fromkeys(row["id"] for row in rows)))
    replayed.ready = [batch.work_of(row) for row in rows if row["ready"]]
    return replayed


def _selected(s: Selection) -> tuple[Any, ...]:
    """A Selection as replayable's first five arguments; no bound is the whole of time, and
    nothing ended after now (a replayed operation that ends again is not taken twice)."""
    now = dt.datetime.now(dt.UTC)
    until = now if s.until is None else min(s.until, now)
    since = s.since or dt.datetime.min.replace(tzinfo=dt.UTC)
    return ([st.value for st in s.statuses], s.operation_type, since, until, s.owner)


def _state(row: asyncpg.Record) -> State:
    return msgspec.convert(dict(row), State)


def _finished(row: asyncpg.Record) -> Outcome:
    return Outcome(
        id=row["id"],
        operation_type=row["operation_type"],
        status=Status(row["status"]),
        error=row["error"],
        attempts=row["attempts"],
        batch_id=row["batch_id"],
        meta=row["meta"],
        user_operation_id=row["user_operation_id"],
    )


def _ended(row: asyncpg.Record, status: Status, error: str | None) -> Outcome:
    return Outcome(
        id=row["id"],
        operation_type=row["operation_type"],
        status=status,
        error=error,
        attempts=row["attempts"],
        batch_id=None,
        meta=row["meta"],
        user_operation_id=row["user_operation_id"],
    )
