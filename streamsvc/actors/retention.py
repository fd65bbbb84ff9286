"""Retention: finished operations older than STREAMSVC_RETENTION_DAYS are deleted, and the
streams that only grow are trimmed, without getting in the way of intake or flushing
(docs/retention.md).

1. The rejects, dead-letter and outcome streams are trimmed, one atomic script per stream
   (``Streams.trim``): entries older than the retention age, and past
   STREAMSVC_STREAM_MAXLEN every acknowledged one, but never an entry a consumer group has
   not acknowledged. The inbox and the work streams are never touched.
2. Rows that finished (SUCCESS, FAIL, CANCELLED) before the retention age are deleted in
   batches of STREAMSVC_RETENTION_BATCH, each its own short transaction that skips rows
   someone else holds and gives up on a lock wait after a few milliseconds (it is tried
   again next cycle). After each batch it pauses at least as long as the batch took, so it
   never holds more than half of one connection's time however large the backlog.

Safe in every process that runs it (role ``sweeper`` or ``all``): two at once delete
disjoint rows (SKIP LOCKED), and a trim only ever drops what no group still needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import structlog

from streamsvc import metrics
from streamsvc.actors import periodic
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import LockWait
from streamsvc.store import Store

log = structlog.get_logger("streamsvc.retention")

# After each delete batch, a pause of IDLE_PER_BUSY times as long as the batch took (at
# least PAUSE_S): retention holds at most 1 / (1 + IDLE_PER_BUSY) of one connection's time
# and its share of the server's CPU, WAL and I/O comes in bursts the flushers' transactions
# slip between.
PAUSE_S = 0.02
IDLE_PER_BUSY = 3.0


@dataclass(slots=True)
class RetentionReport:
    deleted_rows: int = 0
    trimmed: dict[str, int] = field(default_factory=dict)  # entries, by stream label


class Retention:
    def __init__(
        self,
        store: Store,
        streams: rs.Streams,
        *,
        older_than_s: float,
        batch: int,
        interval_ms: int,
        pause_s: float = PAUSE_S,
    ) -> None:
        self.store = store
        self.streams = streams
        self.older_than_s = older_than_s  # 0: rows kept for good, streams only capped
        self.batch = batch
        self.interval_ms = interval_ms
        self.pause_s = pause_s

    async def run(self) -> None:
        """A cycle every interval; a failed one is logged and tried again next time."""
        await periodic.every(self.interval_ms, self.cycle, log=log, event="retention")

    async def cycle(self) -> RetentionReport:
        """Trim the streams, then delete old rows until none is left (or a lock is busy)."""
        report = RetentionReport()
        age_ms = round(self.older_than_s * 1000)
        for label, stream in self.streams.names.trimmed:
            trimmed = await self.streams.trim(stream, age_ms=age_ms)
            if trimmed:
                report.trimmed[label] = report.trimmed.get(label, 0) + trimmed
                metrics.stream_trimmed.labels(label).inc(trimmed)
        if self.older_than_s > 0:
            await self._expire(report)
        return report

    async def _expire(self, report: RetentionReport) -> None:
        while True:
            started = time.monotonic()
            try:
                deleted = await self.store.expire(self.older_than_s, self.batch)
            except LockWait as exc:
                log.info("retention.lock_busy", error=str(exc), next="trying again next cycle")
                return
            report.deleted_rows += deleted
            metrics.expired.inc(deleted)
            if deleted < self.batch:
                return
            await anyio.sleep(max(self.pause_s, IDLE_PER_BUSY * (time.monotonic() - started)))
