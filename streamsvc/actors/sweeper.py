"""Sweeper: recover what crashes and Redis data loss leave behind.

1. Work entries unacked for longer than ``claim_idle_ms`` (their flusher died or hangs)
   are put back on the work stream; an entry that keeps coming back is split in two, so a
   poison operation ends up alone, and that one is dead-lettered after ``max_deliveries``.
2. BatchOperations rows still pending that no stream can hold (Redis lost its data, or a
   crash came between the INSERT and the XADD) are re-enqueued from PostgreSQL. A row is
   stale when it was last touched ``interval_ms`` before the oldest entry still in the
   work stream (or before now, when the stream is empty): every entry is appended after
   its rows were written, so an older row cannot be in the stream.
Re-enqueueing something a flusher still holds is harmless: flushers apply only pending rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import anyio
import asyncpg
import msgspec
import structlog

from streamsvc import metrics, queries
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import translate
from streamsvc.model import (
    Operation,
    Outcome,
    Status,
    WorkOp,
    user_id,
    work_decoder,
    work_encoder,
)
from streamsvc.policy import StuckAction, halves, stuck_entry

log = structlog.get_logger("streamsvc.sweeper")

_body = msgspec.json.Decoder(Operation)


@dataclass(slots=True)
class SweepReport:
    reenqueued_entries: int = 0
    split_entries: int = 0
    dead_lettered: int = 0
    reenqueued_rows: int = 0


class Sweeper:
    def __init__(
        self,
        name: str,
        pool: asyncpg.Pool,
        streams: rs.Streams,
        *,
        interval_ms: int,
        claim_idle_ms: int,
        max_deliveries: int,
        chunk: int,
        page: int = 1000,
    ) -> None:
        self.name = name
        self.pool = pool
        self.streams = streams
        self.interval_ms = interval_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.chunk = chunk
        self.page = page

    async def run(self) -> None:
        """Sweep every interval; a failed sweep is logged and tried again next time."""
        while True:
            try:
                report = await self.sweep()
                if report != SweepReport():
                    log.info("sweep.done", **asdict(report))
            except Exception as exc:
                log.warning(
                    "sweep.failed",
                    error=str(translate(exc)),
                    next=f"sweeping again in {self.interval_ms / 1000:.1f} s",
                )
            await anyio.sleep(self.interval_ms / 1000)

    async def sweep(self) -> SweepReport:
        report = SweepReport()
        names = self.streams.names
        for label in ("inbox", "work", "outcomes", "dead"):
            metrics.stream_pending.labels(label).set(
                await self.streams.length(getattr(names, label))
            )
        await self._stuck_entries(report)
        await self._stale_rows(report)
        await self.streams.drop_idle_consumers(
            self.streams.names.work, rs.FLUSHER_GROUP, min_idle_ms=10 * self.claim_idle_ms
        )
        return report

    # -- 1. entries a flusher took and never acked -----------------------------------------
    async def _stuck_entries(self, report: SweepReport) -> None:
        work = self.streams.names.work
        idle = await self.streams.idle_pending(
            work, rs.FLUSHER_GROUP, min_idle_ms=self.claim_idle_ms, count=self.page
        )
        delivered = dict(idle)
        claimed = await self.streams.claim(
            work,
            rs.FLUSHER_GROUP,
            self.name,
            min_idle_ms=self.claim_idle_ms,
            ids=list(delivered),
        )
        for entry_id, fields in claimed:
            deliveries = int(fields.get(b"d", b"0")) + delivered[entry_id]
            try:
                items = work_decoder.decode(fields[b"ops"])
            except Exception as exc:
                await self._dead_letter(entry_id, fields, f"undecodable work entry: {exc}", [])
                report.dead_lettered += 1
                continue
            action = stuck_entry(
                operations=len(items), deliveries=deliveries, max_deliveries=self.max_deliveries
            )
            if action is StuckAction.DEAD_LETTER:
                reason = f"dead-lettered after {deliveries} deliveries without an ack"
                await self._dead_letter(entry_id, fields, reason, items)
                report.dead_lettered += len(items)
                continue
            parts = [items]
            if action is StuckAction.SPLIT:
                first, _ = halves(len(items))
                parts = [items[:first], items[first:]]
                report.split_entries += 1
            entries = [{"ops": work_encoder.encode(p), "d": deliveries} for p in parts]
            async with self.pool.acquire() as conn:
                await conn.execute(queries.TOUCH_PENDING, [i.id for i in items])
            await self.streams.ack_with(work, rs.FLUSHER_GROUP, [entry_id], work, entries)
            report.reenqueued_entries += 1
            log.info(
                "sweep.entry_reenqueued",
                entry=entry_id.decode(),
                deliveries=deliveries,
                operations=len(items),
                parts=len(parts),
            )

    async def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, items: list[WorkOp]
    ) -> None:
        """FAIL the entry's pending operations, report them, and park the entry."""
        names = self.streams.names
        outcomes: list[Outcome] = []
        if items:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(queries.FAIL_PENDING, [i.id for i in items], reason)
            users = {i.id: user_id(i.op) for i in items}
            outcomes = [
                Outcome(op_id, op_type, Status.FAIL, reason, attempts, None, meta, users.get(op_id))
                for op_id, op_type, attempts, meta in rows
            ]
        if outcomes:
            await self.streams.add(names.outcomes, [{"o": work_encoder.encode(outcomes)}])
        dead = {
            "entry": entry_id,
            "ops": msgspec.json.encode(items) if items else fields.get(b"ops", b""),
            "reason": reason,
        }
        await self.streams.ack_with(names.work, rs.FLUSHER_GROUP, [entry_id], names.dead, [dead])
        metrics.dead_lettered.inc(max(1, len(items)))
        log.warning(
            "sweep.dead_lettered", entry=entry_id.decode(), reason=reason, operations=len(items)
        )

    # -- 2. pending rows no stream holds --------------------------------------------------
    async def _stale_rows(self, report: SweepReport) -> None:
        work = self.streams.names.work
        now_ms = await self.streams.now_ms()
        oldest = await self.streams.oldest_ms(work)
        horizon_ms = min(now_ms, oldest if oldest is not None else now_ms) - self.interval_ms
        cutoff = dt.datetime.fromtimestamp(horizon_ms / 1000, dt.UTC)
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(queries.CLAIM_STALE, cutoff, self.page)
            if not rows:
                return
            items = [WorkOp(op_id, _body.decode(body)) for op_id, body in rows]
            entries = [
                {"ops": work_encoder.encode(items[i : i + self.chunk])}
                for i in range(0, len(items), self.chunk)
            ]
            await self.streams.add(work, entries)
            report.reenqueued_rows += len(items)
            metrics.reenqueued.inc(len(items))
            log.info("sweep.rows_reenqueued", operations=len(items))
            if len(rows) < self.page:
                return
