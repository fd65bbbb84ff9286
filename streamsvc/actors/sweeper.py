"""Sweeper: recover what crashes and Redis data loss leave behind.

1. Work entries of a flusher whose process died (its heartbeat expired) are put back on
   their work stream at once (``take_over``, every heartbeat); entries unacked for longer
   than ``claim_idle_ms`` (a flusher that hangs in a live process) are too. An entry that
   keeps coming back is split in two, so a poison operation ends up alone, and that one
   is dead-lettered after ``max_deliveries``.
2. BatchOperations rows still pending that no stream can hold (Redis lost its data, or a
   crash came between the INSERT and the XADD) are re-enqueued from PostgreSQL. A row is
   stale when it was last touched ``interval_ms`` before the oldest entry still in any
   work stream (or before now, when they are empty): every entry is appended promptly
   after its rows were written or touched, so an older row cannot be in a stream. Rows
   held back (parked behind their key, or waiting for their runAt) are not on a stream by
   design and are left alone; a key whose turn came while nobody released it (a crash
   between a cancel and its release) is released, and so are rows still held for an
   operationType that is no longer paused (a resume stopped half way).
Re-enqueueing something a flusher still holds is harmless: flushers apply only pending rows.
3. Outcomes Redis lost before they were relayed are put on the outcome streams again
   (streamsvc.actors.announcements).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from streamsvc import metrics
from streamsvc.actors import periodic
from streamsvc.actors.announcements import Announcements
from streamsvc.actors.heartbeat import abandoned_after_ms
from streamsvc.adapters import streams as rs
from streamsvc.manage import Manager
from streamsvc.model import WorkOp, work_decoder, work_encoder
from streamsvc.policy import StuckAction, halves, stuck_entry
from streamsvc.store import Store

log = structlog.get_logger("streamsvc.sweeper")


@dataclass(slots=True)
class SweepReport:
    reenqueued_entries: int = 0
    split_entries: int = 0
    dead_lettered: int = 0
    reenqueued_rows: int = 0
    released_keys: int = 0
    released_paused: int = 0
    reannounced: int = 0
    taken_over_from: list[str] = field(default_factory=list)  # consumers of dead processes


class Sweeper:
    def __init__(
        self,
        name: str,
        store: Store,
        streams: rs.Streams,
        *,
        interval_ms: int,
        claim_idle_ms: int,
        max_deliveries: int,
        chunk: int,
        heartbeat_ms: int = 1000,
        page: int = 1000,
    ) -> None:
        self.name = name
        self.store = store
        self.streams = streams
        self.interval_ms = interval_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.chunk = chunk
        self.heartbeat_ms = heartbeat_ms
        self.page = page
        self.manage = Manager(store, streams, chunk=chunk)
        self.announcements = Announcements(store, streams, interval_ms=interval_ms, chunk=chunk)

    async def run(self) -> None:
        """Sweep every interval; a failed sweep is logged and tried again next time."""
        await periodic.every(self.interval_ms, self.sweep, log=log, event="sweep")

    async def sweep(self) -> SweepReport:
        report = SweepReport()
        names = self.streams.names
        for label in ("inbox", "dead"):
            metrics.stream_pending.labels(label).set(
                await self.streams.length(getattr(names, label))
            )
        outcomes = [await self.streams.length(shard.outcomes) for shard in names.shards]
        metrics.stream_pending.labels("outcomes").set(sum(outcomes))
        waiting = 0
        for shard, work in _work_streams(names):
            waiting += await self.streams.length(work)
            await self._stuck_entries(shard, work, report, min_idle_ms=self.claim_idle_ms)
        metrics.stream_pending.labels("work").set(waiting)
        await self._stale_rows(report)
        await self._stuck_keys(report)
        report.reannounced = await self.announcements.keep()
        await self.manage.paused_types()  # the gauge
        report.released_paused = await self.manage.let_go(None)
        for _, work in _work_streams(names):
            await self.streams.drop_idle_consumers(
                work, rs.FLUSHER_GROUP, min_idle_ms=10 * self.claim_idle_ms
            )
        return report

    async def run_take_over(self) -> None:
        """Take over dead processes' work every heartbeat (``take_over``)."""
        await periodic.every(self.heartbeat_ms, self.take_over, log=log, event="take_over")

    async def take_over(self) -> SweepReport:
        """The entries of flushers whose process's heartbeat expired (it died, see
        streamsvc.actors.heartbeat) are put back on their streams now, not after
        ``claim_idle_ms``; the dead processes' consumers that hold nothing are removed from
        the groups. A live process's consumers are never touched, however long their
        entries have been theirs."""
        report = SweepReport()
        names = self.streams.names
        idle_ms = abandoned_after_ms(self.heartbeat_ms)
        for shard, work in _work_streams(names):
            for consumer, pending in await self.streams.dead_consumers(work, rs.FLUSHER_GROUP):
                if pending:
                    await self._stuck_entries(
                        shard, work, report, min_idle_ms=idle_ms, consumer=consumer
                    )
                    report.taken_over_from.append(consumer)
                await self.streams.drop_consumer(work, rs.FLUSHER_GROUP, consumer)
        # The inbox readers and notifiers take their dead peers' entries over themselves.
        others = [(names.inbox, rs.INGRESS_GROUP)]
        others += [(shard.outcomes, rs.NOTIFIER_GROUP) for shard in names.shards]
        for stream, group in others:
            for consumer, pending in await self.streams.dead_consumers(stream, group):
                if not pending:
                    await self.streams.drop_consumer(stream, group, consumer)
        return report

    # -- 1. entries a flusher took and never acked -----------------------------------------
    async def _stuck_entries(
        self,
        shard: rs.Names,
        work: str,
        report: SweepReport,
        *,
        min_idle_ms: int,
        consumer: str | None = None,
    ) -> None:
        """The entries of ``work`` (a stream of ``shard``) unacked for ``min_idle_ms`` (by
        ``consumer``, when given), put back, split, or dead-lettered."""
        idle = await self.streams.idle_pending(
            work, rs.FLUSHER_GROUP, min_idle_ms=min_idle_ms, count=self.page, consumer=consumer
        )
        delivered = dict(idle)
        claimed = await self.streams.claim(
            work,
            rs.FLUSHER_GROUP,
            self.name,
            min_idle_ms=min_idle_ms,
            ids=list(delivered),
        )
        for entry_id, fields in claimed:
            deliveries = int(fields.get(b"d", b"0")) + delivered[entry_id]
            try:
                items = work_decoder.decode(fields[b"ops"])
            except Exception as exc:
                reason = f"undecodable work entry: {exc}"
                await self._dead_letter(shard, work, entry_id, fields, reason, [])
                report.dead_lettered += 1
                continue
            action = stuck_entry(
                operations=len(items), deliveries=deliveries, max_deliveries=self.max_deliveries
            )
            if action is StuckAction.DEAD_LETTER:
                reason = f"dead-lettered after {deliveries} deliveries without an ack"
                await self._dead_letter(shard, work, entry_id, fields, reason, items)
                report.dead_lettered += len(items)
                continue
            parts = [items]
            if action is StuckAction.SPLIT:
                first, _ = halves(len(items))
                parts = [items[:first], items[first:]]
                report.split_entries += 1
            entries = [{"ops": work_encoder.encode(p), "d": deliveries} for p in parts]
            await self.store.touch_pending([i.id for i in items])
            await self.streams.ack_with(work, rs.FLUSHER_GROUP, [entry_id], work, entries)
            report.reenqueued_entries += 1
            log.info(
                "sweep.entry_reenqueued",
                entry=entry_id.decode(),
                deliveries=deliveries,
                operations=len(items),
                parts=len(parts),
                ids=[i.id for i in items],
            )

    async def _dead_letter(
        self,
        shard: rs.Names,
        work: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        reason: str,
        items: list[WorkOp],
    ) -> None:
        """FAIL the entry's pending operations, report them (on ``shard``'s streams, in the
        ack's transaction), and park the entry."""
        adds: list[tuple[str, dict[Any, Any]]] = []
        if items:
            ended = await self.store.fail_pending([i.id for i in items], reason)
            if ended.outcomes:
                adds.append((shard.outcomes, {"o": work_encoder.encode(ended.outcomes)}))
            adds.extend(rs.work_entries(shard, ended.released, self.chunk))
        dead = {
            "entry": entry_id,
            "ops": msgspec.json.encode(items) if items else fields.get(b"ops", b""),
            "reason": reason,
        }
        adds.append((shard.dead, dead))
        await self.streams.ack_adding(rs.FLUSHER_GROUP, {work: [entry_id]}, adds)
        metrics.dead_lettered.inc(max(1, len(items)))
        log.warning(
            "sweep.dead_lettered",
            entry=entry_id.decode(),
            reason=reason,
            operations=len(items),
            ids=[i.id for i in items],
        )

    # -- 2. pending rows no stream holds --------------------------------------------------
    async def _stale_rows(self, report: SweepReport) -> None:
        now_ms = await self.streams.now_ms()
        oldest = [await self.streams.oldest_ms(w) for _, w in _work_streams(self.streams.names)]
        horizon_ms = min([now_ms, *(ms for ms in oldest if ms is not None)]) - self.interval_ms
        cutoff = dt.datetime.fromtimestamp(horizon_ms / 1000, dt.UTC)
        while True:
            items = await self.store.stale(cutoff, self.page)
            if not items:
                return
            await self.streams.add_each(self.streams.spread(items, self.chunk))
            report.reenqueued_rows += len(items)
            metrics.reenqueued.inc(len(items))
            log.info("sweep.rows_reenqueued", operations=len(items))
            if len(items) < self.page:
                return

    async def _stuck_keys(self, report: SweepReport) -> None:
        released = await self.store.release_stuck(self.page)
        if released:
            await self.streams.add_each(self.streams.spread(released, self.chunk))
            report.released_keys += len(released)
            log.info("sweep.keys_released", operations=len(released))


def _work_streams(names: rs.Names) -> list[tuple[rs.Names, str]]:
    """Every shard's work streams, each with its shard."""
    return [(shard, work) for shard in names.shards for work in shard.work_streams]
