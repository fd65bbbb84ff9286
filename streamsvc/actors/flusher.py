"""Flusher: claim a batch from the work stream, apply it in ONE transaction, then ack.

The transaction (streamsvc.store.batch) claims and applies only the batch's operations
still pending, so a redelivered or doubly-claimed entry applies nothing twice; the refused
end FAIL alone while the rest land. Here: transient errors roll back and retry with
backoff; a batch that hits the statement timeout twice is cut in halves, each its own
transaction, until the slow operation fails alone (streamsvc.policy). A batch that only
waited for a lock (its tables', or rows another transaction holds) is retried until the
lock is free, without counting it as an attempt: waiting is nobody's fault here. The
outcomes, and the operations whose key's turn came, go to Redis with the ack.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import structlog

from streamsvc import metrics, tracing
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import LockWait, StatementTimeout, translate
from streamsvc.backoff import pause
from streamsvc.errors import TransientError
from streamsvc.model import Status, WorkOp, work_decoder, work_encoder
from streamsvc.pacing import Pacer
from streamsvc.policy import BandTurns, RetryPolicy, Verdict, halves
from streamsvc.store import Applied, Store

log = structlog.get_logger("streamsvc.flusher")


class Flusher:
    def __init__(
        self,
        name: str,
        store: Store,
        streams: rs.Streams,
        retry: RetryPolicy,
        *,
        limit: int,
        block_ms: int = 1000,
        keep_claimed_s: float = 10.0,
        pacer: Pacer | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.streams = streams
        self.retry = retry
        self.limit = limit
        self.block_ms = block_ms
        self.keep_claimed_s = keep_claimed_s  # well under the sweeper's claim-idle time
        self.stopping = False
        self.turns = BandTurns()
        self.pacer = pacer or Pacer(0)  # shared by a process's flushers (streamsvc.pacing)
        # Operations per entry, as seen so far, of all streams (for a blocking read) and of
        # each (for a take): a take asks for about ``limit`` operations' worth of entries.
        # Until entries are seen, as many as an entry may hold: a fresh flusher's first take
        # is one entry, not ``limit`` entries of up to ``limit`` each (which, on a backlog,
        # held all of it while the other flushers had nothing). Kept by stream, so that the
        # small entries of one band (a trickle at priority 9) do not make a take fill up
        # with many full ones of another: a take is about one transaction, and a higher
        # band's operation waits only for the transactions in flight.
        self._ops_per_entry = float(limit)
        self._per_entry: dict[str, float] = {}

    # -- loop --------------------------------------------------------------------------
    async def run(self, *, burst: bool = False) -> None:
        """Claim and apply batches until stopped (or, in burst mode, until nothing waits).

        Each turn takes new entries from the priority bands in the order ``turns`` gives
        (streamsvc.policy.BandTurns: higher first, every band its share); when none has
        any, it waits on all of them at once."""
        failures = 0
        while not self.stopping:
            try:
                async with self.pacer.turn():
                    taken = await self._next(burst)
                if taken is None:
                    return
                if taken:
                    await self.handle(taken)
                failures = 0
            except rs.CONNECTION_EXCEPTIONS as exc:  # unacked work is redelivered later
                failures += 1
                await pause(
                    log, "flusher.redis_unavailable", exc, self.retry, failures, "reading again"
                )

    async def _next(self, burst: bool) -> list[rs.Taken] | None:
        """The entries of the next batch, once the pacer let work gather
        (streamsvc.pacing): new ones from the bands in the order ``turns`` gives, or,
        when none has any, those that come first to any band within ``block_ms`` (none:
        nothing came; None: nothing waits, in burst mode)."""
        names = self.streams.names
        count = max(1, min(self.limit, int(self.limit / self._ops_per_entry)))
        order = [names.work_of(p) for p in self.turns.next()]
        per_entry = [self._per_entry.get(stream, float(self.limit)) for stream in order]
        await self.pacer.gather()
        taken = await self.streams.take(
            order, rs.FLUSHER_GROUP, self.name, operations=self.limit, per_entry=per_entry
        )
        if not taken:
            if burst:
                return None
            taken = await self.streams.wait(
                names.work_streams, rs.FLUSHER_GROUP, self.name, count=count, block_ms=self.block_ms
            )
            if not taken:
                return []
        held = sum(rs.operations_in(fields) for _, (_, fields) in taken)
        gathered = all(rs.gathered(fields) for _, (_, fields) in taken)
        self.pacer.started(full=held >= self.limit or gathered)
        return taken

    async def handle(self, taken: list[rs.Taken]) -> None:
        """Apply every operation of the ``taken`` entries (in transactions of at most
        ``limit``), then report the outcomes and ack the entries in one Redis transaction."""
        items, per_stream = await self._decode(taken)
        ops_count = len(items)
        self._ops_per_entry = 0.8 * self._ops_per_entry + 0.2 * max(1, ops_count / len(taken))
        for stream, (entries, ops) in per_stream.items():
            seen = self._per_entry.get(stream, float(self.limit))
            self._per_entry[stream] = 0.8 * seen + 0.2 * max(1, ops / entries)
        metrics.in_flight.inc(ops_count)
        try:
            async with anyio.create_task_group() as keeping:
                keeping.start_soon(self._keep_claimed, _by_stream(taken))
                result = await self._flush_all(items)
                keeping.cancel_scope.cancel()
            if result is None:
                return  # left unacked: the sweeper hands the entries out again
            with anyio.CancelScope(shield=True):  # committed: the ack must not be cut off
                await self._report(taken, result)
            _observe_latency([entry for _, entry in taken], len(items))
        finally:
            metrics.in_flight.dec(ops_count)

    async def _flush_all(self, items: list[WorkOp]) -> Applied | None:
        """Every operation of ``items``, in transactions of at most ``limit``; None when a
        transaction is left to be tried again later."""
        total = Applied(batch_id="")
        for start in range(0, len(items), self.limit):
            result = await self.flush(items[start : start + self.limit])
            if result is None:
                return None
            _merge(total, result)
        return total

    async def _keep_claimed(self, ids: dict[str, list[bytes]]) -> None:
        """While a batch takes long (waiting for a table another batch holds, retrying,
        being cut), keep its entries marked as ours: the sweeper hands out only entries
        idle for longer than its claim-idle time, as a dead flusher's are."""
        while True:
            await anyio.sleep(self.keep_claimed_s)
            try:
                with anyio.CancelScope(shield=True):  # a command cut off would lose its reply
                    for stream, entry_ids in ids.items():
                        await self.streams.keep(stream, rs.FLUSHER_GROUP, self.name, entry_ids)
            except rs.CONNECTION_EXCEPTIONS as exc:
                log.warning(
                    "flush.keep_claimed_failed",
                    error=str(exc),
                    next=f"trying again in {self.keep_claimed_s} s",
                )

    async def _decode(
        self, taken: list[rs.Taken]
    ) -> tuple[list[WorkOp], dict[str, tuple[int, int]]]:
        """The operations of the ``taken`` entries, and (entries, operations) of each
        stream; an entry that is not ours is dead-lettered."""
        items: list[WorkOp] = []
        per_stream: dict[str, tuple[int, int]] = {}
        for stream, (entry_id, fields) in taken:
            try:
                ops = work_decoder.decode(fields[b"ops"])
                items.extend(ops)
                entries, count = per_stream.get(stream, (0, 0))
                per_stream[stream] = (entries + 1, count + len(ops))
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
        return items, per_stream

    async def _report(self, taken: list[rs.Taken], result: Applied) -> None:
        """Ack the ``taken`` entries, and add the outcomes and the released operations, in
        one Redis transaction."""
        names = self.streams.names
        outcomes = result.outcomes + result.earlier
        adds: list[tuple[str, dict[Any, Any]]] = []
        if outcomes:
            adds.append((names.outcomes, {"o": work_encoder.encode(outcomes)}))
        adds.extend(rs.work_entries(names, result.released, self.limit))
        await self.streams.ack_adding(rs.FLUSHER_GROUP, _by_stream(taken), adds)

    # -- one batch ---------------------------------------------------------------------
    async def flush(self, items: Sequence[WorkOp], *, timeouts: int = 0) -> Applied | None:
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
            batch_id = str(uuid.uuid4())
            try:
                result = await self._apply(items, batch_id)
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
                    batch_id=batch_id,
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
            failed = sum(o.status is Status.FAIL for o in result.outcomes)
            metrics.succeeded.inc(len(result.outcomes) - failed)
            metrics.failed.inc(failed)
            metrics.last_success.set_to_current_time()
            return result

    async def _apply(self, items: Sequence[WorkOp], batch_id: str) -> Applied:
        """One batch transaction: its span, and every line logged meanwhile, carry its id."""
        with (
            structlog.contextvars.bound_contextvars(batch_id=batch_id),
            tracing.batch(items, batch_id) as span,
        ):
            result = await self.store.apply(items, batch_id=batch_id)
            tracing.batch_done(span, result.outcomes)
            return result

    async def _split(self, items: Sequence[WorkOp], timeouts: int) -> Applied | None:
        """Apply the halves of ``items`` one after the other, each in its own transactions
        (cut further while they time out), so the operations at fault end up alone."""
        first, _ = halves(len(items))
        result = Applied(batch_id=str(uuid.uuid4()))
        for part in (items[:first], items[first:]):
            done = await self.flush(part, timeouts=timeouts)
            if done is None:
                return None  # left unacked: what committed is only reported again
            _merge(result, done)
        return result

    async def _count_attempt(self, items: Sequence[WorkOp], error: str) -> None:
        try:
            await self.store.count_attempt([i.id for i in items], error)
        except Exception as exc:  # the database may be what is down; the count can wait
            log.info("flush.attempt_not_counted", error=str(translate(exc)))

    async def _fail_all(self, items: Sequence[WorkOp], error: str) -> Applied | None:
        """Give up on a batch: every still-pending operation ends FAIL with ``error``."""
        try:
            ended = await self.store.fail_pending([i.id for i in items], error)
        except Exception as exc:
            log.warning(
                "flush.fail_not_recorded",
                error=str(translate(exc)),
                next="left unacked for redelivery",
            )
            return None
        metrics.failed.inc(len(ended.outcomes))
        return Applied(batch_id=str(uuid.uuid4()), outcomes=ended.outcomes, released=ended.released)


def _by_stream(taken: list[rs.Taken]) -> dict[str, list[bytes]]:
    ids: dict[str, list[bytes]] = {}
    for stream, (entry_id, _) in taken:
        ids.setdefault(stream, []).append(entry_id)
    return ids


def _merge(into: Applied, result: Applied) -> None:
    into.outcomes.extend(result.outcomes)
    into.earlier.extend(result.earlier)
    into.released.extend(result.released)


def _observe_latency(entries: list[rs.Entry], operations: int) -> None:
    """Submit-to-finish latency, from the time in the oldest entry's id (its XADD)."""
    now_ms = time.time() * 1000
    per_entry = max(1, operations // len(entries))
    for entry_id, _ in entries:
        seconds = max(0.0, now_ms - int(entry_id.split(b"-")[0])) / 1000
        for _ in range(per_entry):
            metrics.latency_seconds.observe(seconds)
