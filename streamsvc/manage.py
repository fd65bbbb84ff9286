"""Queue management: replay operations that ended FAIL or CANCELLED, pause and resume an
operationType (docs/queue.md).

Each change is made in PostgreSQL first; the operations it lets go are then put on the work
streams. Should Redis refuse them, or the process die in between, they are pending and just
touched, so the sweeper puts them there after its interval (and lets go of any operation
still held for a type that is no longer paused). A replayed operation is applied at most
once whatever happens: a replay changes only operations that ended without being applied,
and a batch applies only pending ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import msgspec
import structlog

from streamsvc import metrics
from streamsvc.adapters import streams as rs
from streamsvc.errors import InvalidOperation
from streamsvc.model import MAX_TYPE_BYTES, WorkOp
from streamsvc.store import PausedType, Retried, Selection, Store
from streamsvc.validate import Caller, label, lookup

log = structlog.get_logger("streamsvc.manage")

PAGE = 1000  # operations per statement: a replay or resume of millions holds no long lock


class Manager:
    def __init__(self, store: Store, streams: rs.Streams, *, chunk: int) -> None:
        self.store = store
        self.streams = streams
        self.chunk = chunk  # operations per work-stream entry (BATCH_PROCESS_OPERATION_LIMIT)

    async def retry(self, op_id: str, *, caller: Caller | None = None) -> Retried:
        """Replay the operation ``caller`` would find by ``op_id`` (its id, or its
        userOperationId), when it ended FAIL or CANCELLED; the answer carries the operation
        as the retry left it (None: unknown to ``caller``)."""
        scoped = lookup(op_id, caller)
        if scoped is None:
            return Retried("unknown")
        owner, looker = scoped
        result = await self.store.retry(op_id, owner=owner, looker=looker)
        if result.verdict == "replayed":
            metrics.replayed.inc()
            await self._put(result.ready)
        return result

    async def replay(
        self, selection: Selection, *, ids: Sequence[str] = (), dry_run: bool = False
    ) -> int:
        """Replay the operations ``ids`` (when given: those of them with one of the
        selection's statuses and its operationType, if it names one), else every one
        ``selection`` takes that ended before now; how many (with ``dry_run``: how many
        would be, changing nothing)."""
        if ids:
            return await self._replay_ids(selection, ids, dry_run=dry_run)
        now = dt.datetime.now(dt.UTC)
        until = now if selection.until is None else min(selection.until, now)
        selection = msgspec.structs.replace(selection, until=until)
        if dry_run:
            return await self.store.count_replayable(selection)
        total = 0
        while page := await self.store.replayable(selection, PAGE):
            total += await self._replay_page(page)
            if len(page) < PAGE:
                break
        return total

    async def pause(self, operation_type: str, *, by: str) -> PausedType:
        """Pause ``operation_type``: its operations are still stored; once this returns,
        none is applied until ``resume``."""
        _check_type(operation_type)
        await self.store.pause(operation_type, by=by)
        log.info("queue.paused", operation_type=operation_type, by=by)
        paused = await self.paused_types()
        return next(p for p in paused if p.operation_type == operation_type)

    async def resume(self, operation_type: str) -> int:
        """Resume ``operation_type`` and put its held operations on the work streams in the
        order they were stored; how many were held."""
        _check_type(operation_type)
        was_paused = await self.store.resume(operation_type)
        released = await self.let_go(operation_type)
        log.info("queue.resumed", operation_type=operation_type, released=released)
        if not was_paused and not released:
            log.info("queue.resume_not_paused", operation_type=operation_type)
        await self.paused_types()  # the gauge
        return released

    async def let_go(self, operation_type: str | None) -> int:
        """Put the operations held for ``operation_type`` (None: for every type no longer
        paused) on the work streams, page by page; how many."""
        total = 0
        while items := await self.store.unpause(operation_type, PAGE):
            total += len(items)
            await self._put(items)
        return total

    async def paused_types(self) -> list[PausedType]:
        paused = await self.store.paused_types()
        metrics.paused_types.set(len(paused))
        return paused

    async def _replay_ids(self, selection: Selection, ids: Sequence[str], *, dry_run: bool) -> int:
        wanted = list(dict.fromkeys(ids))
        total = 0
        for start in range(0, len(wanted), PAGE):
            states = await self.store.states(wanted[start : start + PAGE])
            page = [
                i
                for i, s in states.items()
                if s.status in selection.statuses
                and selection.operation_type in (None, s.operation_type)
            ]
            total += len(page) if dry_run else await self._replay_page(page)
        return total

    async def _replay_page(self, ids: list[str]) -> int:
        replayed = await self.store.replay(ids)
        metrics.replayed.inc(len(replayed.ids))
        await self._put(replayed.ready)
        return len(replayed.ids)

    async def _put(self, items: Sequence[WorkOp]) -> None:
        if items:
            await self.streams.enqueue(items, self.chunk, log=log, event="queue.enqueue_failed")


def _check_type(operation_type: str) -> None:
    """An operationType as an operation's would be checked (it reaches PostgreSQL)."""
    if not operation_type:
        raise InvalidOperation("operationType", "must not be empty")
    label("operationType", operation_type, MAX_TYPE_BYTES)
