"""Outcomes Redis lost before they were relayed, put on the outcome streams again.

A flusher adds an operation's outcome to an outcome stream right after the batch commits,
and the notifier deletes it once RabbitMQ confirmed its event. So every operation that
finished ``interval_ms`` before the oldest entry still in any outcome stream (or before
now, when they are empty) had its outcome relayed: the reasoning the sweeper's stale rows
rest on, with the same clock assumption. Each sweep moves that point forward in
PostgreSQL (``Announced.before``), with the time Redis was last seen holding the data it
was measured on (``seen``).

Each shard keeps a key of its own (``Names.epoch``), in its outcome stream's slot, so it
is lost with it. A missing key means that shard's Redis lost its data, or that this is
its first sweep. Then the outcomes of every operation that finished since the point are
put on the outcome streams again: at least once, so some are announced twice (callers
correlate by id) and none is lost. When that Redis restarted after it was last seen
(restarted empty), nothing it lost finished after it started again, and the window ends
there; after a FLUSHALL it ends now.
"""

from __future__ import annotations

import datetime as dt
import secrets

import structlog

from streamsvc.adapters import streams as rs
from streamsvc.model import work_encoder
from streamsvc.store import Announced, Store

log = structlog.get_logger("streamsvc.sweeper")


class Announcements:
    def __init__(self, store: Store, streams: rs.Streams, *, interval_ms: int, chunk: int):
        self.store = store
        self.streams = streams
        self.interval_ms = interval_ms
        self.chunk = chunk

    async def keep(self) -> int:
        """Put back what a Redis that lost its data took with it (how many outcomes), or
        move the point forward."""
        redis, shards = self.streams.redis, self.streams.names.shards
        epochs = [await redis.get(shard.epoch) for shard in shards]
        lost = [shard for shard, epoch in zip(shards, epochs, strict=True) if epoch is None]
        if lost:
            point = await self.store.announced()
            count = 0
            if point is not None:
                until = await self._lost_until(lost, point.seen)
                count = await self._announce(point.before, until)
            for shard in lost:
                await redis.set(shard.epoch, secrets.token_hex(8))
            return count
        now_ms = await self.streams.now_ms()
        oldest = [await self.streams.oldest_ms(shard.outcomes) for shard in shards]
        before_ms = min([now_ms, *(ms for ms in oldest if ms is not None)]) - self.interval_ms
        if [await redis.get(shard.epoch) for shard in shards] == epochs:  # the same data
            await self.store.mark_announced(Announced(_time(before_ms), _time(now_ms)))
        return 0

    async def _lost_until(self, lost: list[rs.Names], seen: dt.datetime) -> dt.datetime | None:
        """The latest an outcome the ``lost`` shards' Redis lost can have finished: each
        one restarted since ``seen`` lost nothing finished after it started (give or take
        the interval); None when one lost its data without a restart (or will not say when
        it started)."""
        ends: list[int] = []
        for shard in lost:
            started_ms = await self.streams.started_ms(shard.epoch)
            if started_ms is None or started_ms <= seen.timestamp() * 1000:
                return None
            ends.append(started_ms + self.interval_ms)
        return _time(max(ends))

    async def _announce(self, since: dt.datetime, until: dt.datetime | None) -> int:
        """Put the outcomes of everything finished between ``since`` and ``until`` (now,
        when None) on the outcome streams, a page an entry, each on the next shard."""
        start, count, after = since, 0, None
        while True:
            page = await self.store.outcomes_since(since, after, until, self.chunk)
            if not page:
                break
            outcomes = [outcome for _, outcome in page]
            shard = self.streams.next_shard()
            await self.streams.add(shard.outcomes, [{"o": work_encoder.encode(outcomes)}])
            count += len(outcomes)
            since, after = page[-1][0], outcomes[-1].id
        if count:
            log.warning(
                "sweep.outcomes_reannounced",
                operations=count,
                since=start.isoformat(),
                until=until.isoformat() if until else "now",
                why="Redis lost its data: outcomes not yet relayed may have gone with it",
            )
        return count


def _time(ms: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
