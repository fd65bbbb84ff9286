"""The store: every statement about BatchOperations, behind methods named for what they do.

The actors never hold SQL or a connection: they call a ``Store``. ``PgStore``
(streamsvc.store.postgres) is the real one, its statements named in sql/queries.sql;
``MemoryStore`` (streamsvc.store.memory) keeps the same promises in memory, for unit
tests of the actors without servers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from streamsvc.model import (
    ListQuery,
    OperationCounts,
    OperationPage,
    OperationView,
    Outcome,
    WorkOp,
)
from streamsvc.store.records import (
    Announced,
    Applied,
    Cancelled,
    Due,
    Ended,
    Intake,
    Minute,
    NewOperation,
    PausedType,
    Replayed,
    Retried,
    Selection,
    State,
    Summary,
)

__all__ = [
    "Announced",
    "Applied",
    "Cancelled",
    "Due",
    "Ended",
    "Intake",
    "Minute",
    "NewOperation",
    "PausedType",
    "Replayed",
    "Retried",
    "Selection",
    "State",
    "Store",
    "Summary",
]


class Store(Protocol):
    async def intake(self, rows: Sequence[NewOperation]) -> Intake:
        """Store ``rows`` (ids seen before stay as they are): one group commit. Rows the
        database refuses on their data are refused alone; any other error fails them all."""

    async def states(self, ids: Sequence[str]) -> dict[str, State]:
        """Where the operations with these ids stand (unknown ids are left out)."""

    async def get(
        self, op_id: str, *, owner: str | None, looker: str | None
    ) -> OperationView | None:
        """The operation whose id or userOperationId is ``op_id``, submitted by ``owner``
        (None: by anyone), the ``looker``'s own first."""

    async def list_operations(self, query: ListQuery, *, owner: str | None) -> OperationPage:
        """A page of the operations ``query`` selects, submitted by ``owner`` (None: by
        anyone), newest first."""

    async def apply(self, items: Sequence[WorkOp], *, batch_id: str | None = None) -> Applied:
        """Apply ``items`` in ONE transaction, the batch ``batch_id`` (a new one if None):
        those still pending and due are claimed, applied and marked SUCCESS, or FAIL with
        the database's reason, together. Raises a TransientError (StatementTimeout,
        LockWait) when the transaction must be tried again, a PermanentError when it never
        can be."""

    async def count_attempt(self, ids: Sequence[str], error: str) -> None:
        """A transient failure of these pending operations' batch."""

    async def fail_pending(self, ids: Sequence[str], error: str) -> Ended:
        """End these operations, when still pending, as FAIL with ``error``."""

    async def touch_pending(self, ids: Sequence[str]) -> None:
        """These pending operations were just put on a work stream again."""

    async def stale(self, before: dt.datetime, limit: int) -> list[WorkOp]:
        """Pending operations that should be on a work stream and were untouched since
        ``before`` (Redis lost them, or a crash came before they were put there): touched,
        and returned to be put there."""

    async def due(self, within_s: float, limit: int) -> list[Due]:
        """Take the operations whose runAt comes within ``within_s`` seconds (each taken by
        one caller only); the caller puts them on a work stream when they are due."""

    async def hold_again(self, ids: Sequence[str]) -> None:
        """Give back operations ``due`` returned that will not be put on a stream."""

    async def cancel(self, op_id: str, *, owner: str | None, looker: str | None) -> Cancelled:
        """Cancel the operation ``get`` would find, unless it has finished."""

    async def replay(self, ids: Sequence[str]) -> Replayed:
        """Make the operations ``ids`` that ended FAIL or CANCELLED pending again (the
        others stay as they are), keeping their id, attempts and earlier endings."""

    async def retry(self, op_id: str, *, owner: str | None, looker: str | None) -> Retried:
        """Replay the operation ``get`` would find, when it ended FAIL or CANCELLED; the
        answer carries it as the retry left it."""

    async def replayable(self, selection: Selection, limit: int) -> list[str]:
        """The ids of up to ``limit`` operations ``selection`` takes, earliest ended first."""

    async def count_replayable(self, selection: Selection) -> int:
        """How many operations ``selection`` takes."""

    async def pause(self, operation_type: str, *, by: str) -> dt.datetime:
        """Pause ``operation_type`` (once this returns, no batch applies it); when it was
        paused, now or before."""

    async def resume(self, operation_type: str) -> bool:
        """Resume ``operation_type``; whether it was paused. Its held operations stay held
        until ``unpause`` lets them go."""

    async def paused_types(self) -> list[PausedType]:
        """The paused operationTypes."""

    async def unpause(self, operation_type: str | None, limit: int) -> list[WorkOp]:
        """Let go of up to ``limit`` operations held for ``operation_type`` (None: for any
        type no longer paused), in the order they were stored, to put on a work stream."""

    async def summary(self, *, failures: int, window_s: int) -> Summary:
        """Counts by status, operations finished per second over ``window_s``, and the
        latest ``failures``."""

    async def last_ticks(self) -> dict[str, dt.datetime]:
        """The last submitted tick of each recurring operation."""

    async def record_tick(self, name: str, tick: dt.datetime) -> None:
        """A recurring operation's ``tick`` was submitted."""

    async def release_stuck(self, limit: int) -> list[WorkOp]:
        """Release keys whose earliest pending operation is parked (nobody released it:
        a crash came in between); their released operations, to put on a work stream."""

    async def counts(
        self, since: dt.datetime, until: dt.datetime, *, owner: str | None
    ) -> OperationCounts:
        """The operations submitted by ``owner`` (None: by anyone) and created in
        [``since``, ``until``): by status, and by operationType and status."""

    async def throughput(self, minutes: int) -> list[Minute]:
        """Operations finished in each of the last ``minutes`` minutes, oldest first, the
        current minute (so far) last."""

    async def announced(self) -> Announced | None:
        """How far the outcome events are known to be on their way (None: never marked)."""

    async def mark_announced(self, point: Announced) -> None:
        """Move the point forward (each of its times only forward)."""

    async def outcomes_since(
        self, since: dt.datetime, after: str | None, until: dt.datetime | None, limit: int
    ) -> list[tuple[dt.datetime, Outcome]]:
        """At most ``limit`` operations that finished at or after ``since`` (after the one
        with id ``after`` finished at ``since``, for the next page) and, when given, at or
        before ``until``, oldest first: when each finished, and its outcome."""

    async def expire(self, older_than_s: float, limit: int) -> int:
        """Delete at most ``limit`` operations that finished (SUCCESS, FAIL, CANCELLED) more
        than ``older_than_s`` seconds ago, oldest first; how many were deleted. Rows another
        transaction holds are skipped, never waited for; a lock wait that runs out raises
        LockWait."""
