"""The store in memory: the same promises as PgStore, for unit tests of the actors.

One process, no concurrency inside a call: each method runs to its end before another
starts, as a transaction would. An operation "applied" is recorded in ``applied`` (ids, in
the order their effects landed); ``refuse`` says which ones the database would refuse (their
reason, else None), and ``failures`` holds errors the next ``apply`` calls raise, one each.
``now`` is the clock (the database's, for PgStore), so tests can move time.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from streamsvc.model import (
    Ending,
    ListQuery,
    OperationCounts,
    OperationPage,
    OperationView,
    Outcome,
    Status,
    WorkOp,
    user_id,
)
from streamsvc.store import listing
from streamsvc.store.records import (
    HISTORY_KEPT,
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

PENDING = (Status.UNPROCESSED, Status.PROCESSING)
FINAL = (Status.SUCCESS, Status.FAIL, Status.CANCELLED)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Row:
    """One BatchOperations row."""

    id: str
    op: WorkOp
    source: str
    submitted_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    run_at: dt.datetime | None = None
    status: Status = Status.UNPROCESSED
    error: str | None = None
    attempts: int = 0
    batch_id: str | None = None
    processed_at: dt.datetime | None = None
    wake_at: dt.datetime | None = None
    parked: bool = False
    key_seq: int | None = None
    paused: bool = False
    history: list[Ending] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return self.status in PENDING

    @property
    def key(self) -> tuple[str, str] | None:
        """The orderingKey, as its caller's: (submitted_by, ordering_key)."""
        key = self.op.op.ordering_key
        return None if key is None else (self.submitted_by, key)

    @property
    def queued(self) -> bool:
        """Pending and not held back: it belongs on a work stream."""
        return self.pending and not self.parked and self.wake_at is None and not self.paused

    def state(self) -> State:
        op_type = self.op.op.operation_type
        return State(self.id, op_type, self.status, self.error, self.attempts, self.batch_id)

    def view(self) -> OperationView:
        op = self.op.op
        return OperationView(
            id=self.id,
            operation_type=op.operation_type,
            status=self.status,
            error=self.error,
            attempts=self.attempts,
            priority=op.priority,
            source=self.source,
            batch_id=self.batch_id,
            run_at=self.run_at,
            ordering_key=op.ordering_key,
            created_at=self.created_at,
            updated_at=self.updated_at,
            processed_at=self.processed_at,
            operation=op,
            paused=self.paused,
            history=list(self.history),
        )

    def outcome(self) -> Outcome:
        return Outcome(
            id=self.id,
            operation_type=self.op.op.operation_type,
            status=self.status,
            error=self.error,
            attempts=self.attempts,
            batch_id=self.batch_id,
            meta=self.op.op.meta,
            user_operation_id=user_id(self.op.op),
            traceparent=self.op.op.traceparent,
        )


class MemoryStore:
    def __init__(
        self,
        *,
        refuse: Callable[[WorkOp], str | None] = lambda _: None,
        now: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        self.rows: dict[str, Row] = {}
        self.applied: list[str] = []
        self.failures: list[BaseException] = []
        self.refuse = refuse
        self.now = now
        self.ticks: dict[str, dt.datetime] = {}
        self.paused: dict[str, tuple[str, dt.datetime]] = {}  # operationType: (by, at)
        self.point: Announced | None = None
        self._seq = 0

    # -- intake ------------------------------------------------------------------------
    async def intake(self, rows: Sequence[NewOperation]) -> Intake:
        result = Intake(created=set(), refused={}, ready=[])
        now = self.now()
        keyed: list[Row] = []
        for new in rows:
            if new.id in self.rows:
                continue
            row = Row(new.id, WorkOp(new.id, new.op), new.source, new.submitted_by, now, now)
            row.run_at = new.run_at
            self._seq += 1
            row.key_seq = self._seq
            if new.op.ordering_key is not None:
                row.parked = True
                keyed.append(row)
            elif new.run_at is not None and new.run_at > now:
                row.wake_at = new.run_at
            self.rows[new.id] = row
            result.created.add(new.id)
            if row.queued:
                result.ready.append(row.op)
        result.ready.extend(self._release(keyed))
        return result

    async def states(self, ids: Sequence[str]) -> dict[str, State]:
        return {i: self.rows[i].state() for i in ids if i in self.rows}

    async def get(
        self, op_id: str, *, owner: str | None, looker: str | None
    ) -> OperationView | None:
        row = self._find(op_id, owner, looker)
        return None if row is None else row.view()

    async def list_operations(self, query: ListQuery, *, owner: str | None) -> OperationPage:
        after = decode_cursor(query.cursor, owner) if query.cursor else None
        page = listing.bounds(query, after)
        rows = sorted(
            (
                r
                for r in self.rows.values()
                if (owner is None or r.submitted_by == owner)
                and (query.status is None or r.status is query.status)
                and (query.operation_type in (None, r.op.op.operation_type))
                and r.created_at >= page.since
                and _sort_key(r) < (page.before, page.before_id)
            ),
            key=_sort_key,
            reverse=True,
        )
        items = [r.view() for r in rows[: query.limit]]
        last = items[-1] if len(rows) > query.limit else None
        cursor = encode_cursor(last.created_at, last.id, owner) if last else None
        return OperationPage(items, cursor)

    # -- flushing ----------------------------------------------------------------------
    async def apply(self, items: Sequence[WorkOp], *, batch_id: str | None = None) -> Applied:
        if self.failures:
            raise self.failures.pop(0)
        result = Applied(batch_id=batch_id or str(uuid.uuid4()))
        now = self.now()
        claimed: list[Row] = []
        for item in {i.id: i for i in items}.values():
            row = self.rows.get(item.id)
            if row is None:
                continue
            if row.queued and row.run_at is not None and row.run_at > now:
                row.wake_at = row.run_at  # put on a stream before its time: wait for it again
            elif row.queued and row.op.op.operation_type in self.paused:
                row.paused = True
            elif row.queued:
                claimed.append(row)
            elif not row.pending and row.status is not Status.CANCELLED:
                result.earlier.append(row.outcome())
        for row in claimed:
            error = self.refuse(row.op)
            row.status = Status.FAIL if error else Status.SUCCESS
            row.error = error
            row.attempts += 1
            row.batch_id = result.batch_id
            row.processed_at = row.updated_at = now
            if error is None:
                self.applied.append(row.id)
            result.outcomes.append(row.outcome())
        result.released = self._release(claimed)
        return result

    async def count_attempt(self, ids: Sequence[str], error: str) -> None:
        for row in self._pending(ids):
            row.status, row.error, row.updated_at = Status.PROCESSING, error, self.now()
            row.attempts += 1

    async def fail_pending(self, ids: Sequence[str], error: str) -> Ended:
        ended = [row for row in self._pending(ids) if row.queued]
        for row in ended:
            row.status, row.error = Status.FAIL, error
            row.processed_at = row.updated_at = self.now()
        outcomes = [row.outcome() for row in ended]
        for outcome in outcomes:
            outcome.batch_id = None
        return Ended(outcomes, self._release(ended))

    # -- sweeping and scheduling ----------------------------------------------------------
    async def touch_pending(self, ids: Sequence[str]) -> None:
        for row in self._pending(ids):
            row.updated_at = self.now()

    async def stale(self, before: dt.datetime, limit: int) -> list[WorkOp]:
        rows = sorted(
            (r for r in self.rows.values() if r.queued and r.updated_at < before),
            key=lambda r: r.updated_at,
        )[:limit]
        for row in rows:
            row.updated_at = self.now()
        return [row.op for row in rows]

    async def due(self, within_s: float, limit: int) -> list[Due]:
        now = self.now()
        horizon = now + dt.timedelta(seconds=within_s)
        rows = sorted(
            (r for r in self.rows.values() if r.wake_at is not None and r.wake_at <= horizon),
            key=lambda r: r.wake_at or now,
        )[:limit]
        taken = []
        for row in rows:
            row.wake_at, row.updated_at = None, now
            wait_s = max(0.0, ((row.run_at or now) - now).total_seconds())
            taken.append(Due(row.op, wait_s))
        return taken

    async def hold_again(self, ids: Sequence[str]) -> None:
        for row in self._pending(ids):
            if row.queued and row.run_at is not None:
                row.wake_at = row.run_at

    async def release_stuck(self, limit: int) -> list[WorkOp]:
        heads: dict[tuple[str, str], Row] = {}
        for row in sorted(self.rows.values(), key=lambda r: r.key_seq or 0):
            key = row.key
            if key is not None and row.pending and key not in heads:
                heads[key] = row
        return self._release([row for row in heads.values() if row.parked][:limit])

    # -- callers' requests ---------------------------------------------------------------
    async def cancel(self, op_id: str, *, owner: str | None, looker: str | None) -> Cancelled:
        row = self._find(op_id, owner, looker)
        if row is None:
            return Cancelled("unknown")
        if row.status is Status.CANCELLED:
            return Cancelled("cancelled")
        if not row.pending:
            return Cancelled("finished")
        row.status, row.wake_at, row.parked, row.paused = Status.CANCELLED, None, False, False
        row.processed_at = row.updated_at = self.now()
        outcome = row.outcome()
        outcome.batch_id = None
        released = self._release([row])
        return Cancelled("cancelled", outcome=outcome, released=released)

    # -- queue management ------------------------------------------------------------------
    async def replay(self, ids: Sequence[str]) -> Replayed:
        now = self.now()
        replayed = [self.rows[i] for i in dict.fromkeys(ids) if i in self.rows]
        replayed = [r for r in replayed if r.status in (Status.FAIL, Status.CANCELLED)]
        result = Replayed(ids=[r.id for r in replayed])
        for row in replayed:
            ending = Ending(row.status, row.error, row.attempts, row.batch_id, row.processed_at)
            row.history = [*row.history, ending][-HISTORY_KEPT:]
            row.status, row.error, row.batch_id, row.processed_at = (
                Status.UNPROCESSED,
                None,
                None,
                None,
            )
            row.updated_at, row.paused = now, False
            self._seq += 1
            row.key_seq = self._seq
            if row.key is not None:
                row.parked = True
            elif row.run_at is not None and row.run_at > now:
                row.wake_at = row.run_at
            if row.queued:
                result.ready.append(row.op)
        result.ready.extend(self._release([r for r in replayed if r.key is not None]))
        return result

    async def retry(self, op_id: str, *, owner: str | None, looker: str | None) -> Retried:
        row = self._find(op_id, owner, looker)
        if row is None:
            return Retried("unknown")
        replayed = await self.replay([row.id])
        if replayed.ids:
            return Retried("replayed", view=row.view(), ready=replayed.ready)
        if row.status is Status.SUCCESS:
            return Retried("succeeded", view=row.view())
        return Retried("pending", view=row.view())

    async def replayable(self, selection: Selection, limit: int) -> list[str]:
        return [r.id for r in self._selected(selection)[:limit]]

    async def count_replayable(self, selection: Selection) -> int:
        return len(self._selected(selection))

    async def pause(self, operation_type: str, *, by: str) -> dt.datetime:
        return self.paused.setdefault(operation_type, (by, self.now()))[1]

    async def resume(self, operation_type: str) -> bool:
        return self.paused.pop(operation_type, None) is not None

    async def paused_types(self) -> list[PausedType]:
        held: dict[str, int] = {}
        for row in self.rows.values():
            if row.paused:
                held[row.op.op.operation_type] = held.get(row.op.op.operation_type, 0) + 1
        return [
            PausedType(op_type, by, at, held.get(op_type, 0))
            for op_type, (by, at) in sorted(self.paused.items())
        ]

    async def unpause(self, operation_type: str | None, limit: int) -> list[WorkOp]:
        rows = sorted(
            (
                r
                for r in self.rows.values()
                if r.paused
                and r.op.op.operation_type not in self.paused
                and operation_type in (None, r.op.op.operation_type)
            ),
            key=lambda r: r.key_seq or 0,
        )[:limit]
        for row in rows:
            row.paused, row.updated_at = False, self.now()
        return [row.op for row in rows]

    async def summary(self, *, failures: int, window_s: int) -> Summary:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row.status.value] = counts.get(row.status.value, 0) + 1
        since = self.now() - dt.timedelta(seconds=window_s)
        finished = [r for r in self.rows.values() if r.processed_at and r.processed_at >= since]
        failed = sorted(
            (r for r in self.rows.values() if r.status is Status.FAIL),
            key=lambda r: r.processed_at or r.created_at,
            reverse=True,
        )[:failures]
        return Summary(
            statuses=counts,
            finished_per_s=len(finished) / window_s,
            failures=[
                Failure(r.id, r.op.op.operation_type, r.error, r.processed_at) for r in failed
            ],
        )

    # -- recurring operations --------------------------------------------------------------
    async def last_ticks(self) -> dict[str, dt.datetime]:
        return dict(self.ticks)

    async def record_tick(self, name: str, tick: dt.datetime) -> None:
        self.ticks[name] = max(tick, self.ticks.get(name, tick))

    # -- counts ---------------------------------------------------------------------------
    async def counts(
        self, since: dt.datetime, until: dt.datetime, *, owner: str | None
    ) -> OperationCounts:
        by_status = {status.value: 0 for status in Status}
        by_type: dict[str, dict[str, int]] = {}
        for row in self.rows.values():
            if (owner is None or row.submitted_by == owner) and since <= row.created_at < until:
                by_status[row.status.value] += 1
                statuses = by_type.setdefault(row.op.op.operation_type, {})
                statuses[row.status.value] = statuses.get(row.status.value, 0) + 1
        return OperationCounts(since, until, by_status, by_type)

    async def throughput(self, minutes: int) -> list[Minute]:
        now = self.now().replace(second=0, microsecond=0)
        starts = [now - dt.timedelta(minutes=n) for n in range(minutes - 1, -1, -1)]
        finished = dict.fromkeys(starts, 0)
        for row in self.rows.values():
            if row.processed_at is not None and not row.pending:
                start = row.processed_at.replace(second=0, microsecond=0)
                if start in finished:
                    finished[start] += 1
        return [Minute(start, count) for start, count in finished.items()]

    # -- announcements -----------------------------------------------------------------
    async def announced(self) -> Announced | None:
        return self.point

    async def mark_announced(self, point: Announced) -> None:
        old = self.point or point
        self.point = Announced(max(old.before, point.before), max(old.seen, point.seen))

    async def outcomes_since(
        self, since: dt.datetime, after: str | None, until: dt.datetime | None, limit: int
    ) -> list[tuple[dt.datetime, Outcome]]:
        start = (since, after or "")
        finished = sorted(
            (r.processed_at, r.id)
            for r in self.rows.values()
            if r.status in FINAL
            and r.processed_at is not None
            and (r.processed_at, r.id) > start
            and (until is None or r.processed_at <= until)
        )
        return [(at, self.rows[op_id].outcome()) for at, op_id in finished[:limit]]

    # -- retention -------------------------------------------------------------------------
    async def expire(self, older_than_s: float, limit: int) -> int:
        before = self.now() - dt.timedelta(seconds=older_than_s)
        old = [
            (r.processed_at, r.id)
            for r in self.rows.values()
            if r.status in FINAL and r.processed_at is not None and r.processed_at < before
        ]
        gone = [op_id for _, op_id in sorted(old)[:limit]]
        for op_id in gone:
            del self.rows[op_id]
        return len(gone)

    # -- inside ------------------------------------------------------------------------
    def _pending(self, ids: Sequence[str]) -> list[Row]:
        return [self.rows[i] for i in ids if i in self.rows and self.rows[i].pending]

    def _selected(self, s: Selection) -> list[Row]:
        until = s.until or self.now()
        return sorted(
            (
                r
                for r in self.rows.values()
                if r.status in s.statuses
                and s.operation_type in (None, r.op.op.operation_type)
                and r.processed_at is not None
                and (s.since is None or r.processed_at >= s.since)
                and r.processed_at < until
                and s.owner in (None, r.submitted_by)
            ),
            key=lambda r: (r.processed_at, r.id),
        )

    def _find(self, op_id: str, owner: str | None, looker: str | None) -> Row | None:
        found = [
            r
            for r in self.rows.values()
            if (r.id == op_id or str(r.op.op.user_operation_id) == op_id)
            and (owner is None or r.submitted_by == owner)
        ]
        found.sort(key=lambda r: (r.id != op_id, r.submitted_by != looker, r.created_at))
        return found[0] if found else None

    def _release(self, finished: Sequence[Row]) -> list[WorkOp]:
        """streamsvc_release_keys: the head of each key of ``finished``, when parked,
        taken out."""
        released: list[WorkOp] = []
        now = self.now()
        for key in sorted({row.key for row in finished if row.key is not None}):
            pending = [r for r in self.rows.values() if r.pending and r.key == key]
            if not pending:
                continue
            head = min(pending, key=lambda r: r.key_seq or 0)
            if not head.parked:
                continue
            head.parked, head.updated_at = False, now
            if head.run_at is not None and head.run_at > now:
                head.wake_at = head.run_at
            else:
                released.append(head.op)
        return released


def _sort_key(row: Row) -> tuple[dt.datetime, uuid.UUID]:
    """PostgreSQL's order for a list: creation time, then the id (as uuid compares)."""
    return row.created_at, uuid.UUID(row.id)
