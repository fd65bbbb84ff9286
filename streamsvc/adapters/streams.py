"""Redis Streams: the inbox, the work stream, the outcome stream, rejects and dead letters.

Entries carry many operations each (msgpack lists), so one XADD, XREADGROUP or XACK moves
a whole batch. Acked entries are deleted at once: a stream holds only live work, which is
what lets the sweeper reason about what Redis still holds.

The streams only callers and operators read (rejects, dead letters) and the outcome stream
are capped: each XADD to them trims to about ``maxlen`` entries (``MAXLEN ~``,
STREAMSVC_STREAM_MAXLEN), oldest first, so no caller can grow Redis without bound. The
inbox and the work stream are never trimmed: their unacked entries are operations not yet
stored or not yet applied. An outcome trimmed before the notifier sent it is only a lost
notification: PostgreSQL keeps the operation's status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Names:
    """Every Redis key the service uses, under one prefix."""

    prefix: str

    @property
    def inbox(self) -> str:
        return f"{self.prefix}:inbox"

    @property
    def rejects(self) -> str:
        return f"{self.prefix}:rejects"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def work(self) -> str:
        return f"{self.prefix}:work"

    @property
    def outcomes(self) -> str:
        return f"{self.prefix}:outcomes"

    @property
    def capped(self) -> frozenset[str]:
        """The streams trimmed on every XADD (never the inbox or the work stream)."""
        return frozenset((self.rejects, self.dead, self.outcomes))


INGRESS_GROUP = "ingress"
FLUSHER_GROUP = "flushers"
NOTIFIER_GROUP = "notifier"


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30)


class Streams:
    """Thin, typed wrappers over the stream commands the actors use."""

    def __init__(self, client: aioredis.Redis, names: Names, *, maxlen: int = 100_000) -> None:
        # redis-py's reply types are unions of every protocol's shapes; this class is where
        # replies get their real types, so the client is used untyped here.
        self.redis: Any = client
        self.names = names
        self.maxlen = maxlen
        self._capped = names.capped

    def _xadd(self, pipe: Any, stream: str, fields: dict[Any, Any]) -> None:
        if stream in self._capped:
            pipe.xadd(stream, fields, maxlen=self.maxlen, approximate=True)
        else:
            pipe.xadd(stream, fields)

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (and stream) if missing; from the start, so nothing
        added before the group existed is skipped (e.g. just after Redis lost its data)."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_ms: int | None,
        own_pending: bool = False,
    ) -> list[Entry]:
        """New entries for ``consumer`` (or its own unacked ones), recreating a lost group."""
        start = "0" if own_pending else ">"
        for _ in range(2):
            try:
                reply = await self.redis.xreadgroup(
                    group, consumer, {stream: start}, count=count, block=block_ms
                )
            except redis.exceptions.ResponseError as exc:
                # NOGROUP: the group is gone; UNBLOCKED: the stream was deleted while we
                # waited on it. Either way Redis lost it: recreate and read again.
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                await self.ensure_group(stream, group)
                continue
            # An entry trimmed (MAXLEN) while pending comes back without fields: {} here,
            # which the reader refuses as undecodable and acks.
            return [(eid, fields or {}) for eid, fields in reply[0][1]] if reply else []
        return []

    async def add(self, stream: str, entries: list[dict[Any, Any]]) -> list[bytes]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                self._xadd(pipe, stream, fields)
            return list(await pipe.execute())

    async def ack(self, stream: str, group: str, ids: list[bytes]) -> None:
        if not ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, group, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()

    async def ack_with(
        self, stream: str, group: str, ids: list[bytes], then: str, entries: list[dict[Any, Any]]
    ) -> None:
        """Atomically add ``entries`` to ``then`` and ack (and delete) ``ids``."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for fields in entries:
                self._xadd(pipe, then, fields)
            if ids:
                pipe.xack(stream, group, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()

    async def idle_pending(
        self, stream: str, group: str, *, min_idle_ms: int, count: int
    ) -> list[tuple[bytes, int]]:
        """(entry id, times delivered) of entries unacked for at least ``min_idle_ms``."""
        try:
            rows = await self.redis.xpending_range(
                stream, group, min="-", max="+", count=count, idle=min_idle_ms
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        return [(row["message_id"], int(row["times_delivered"])) for row in rows]

    async def claim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, ids: list[bytes]
    ) -> list[Entry]:
        """Take over idle entries; an entry someone else claimed meanwhile is left out."""
        if not ids:
            return []
        claimed = await self.redis.xclaim(stream, group, consumer, min_idle_ms, ids)
        return [(eid, fields) for eid, fields in claimed if fields is not None]

    async def keep(self, stream: str, group: str, consumer: str, ids: list[bytes]) -> None:
        """Mark entries ``consumer`` is still working on as fresh (XCLAIM JUSTID: their
        delivery count stays), so that no sweeper takes them over as abandoned."""
        if ids:
            await self.redis.xclaim(stream, group, consumer, 0, ids, justid=True)

    async def autoclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[Entry]:
        try:
            reply = await self.redis.xautoclaim(
                stream, group, consumer, min_idle_ms, start_id="0-0", count=count
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        return [(eid, fields) for eid, fields in reply[1] if fields is not None]

    async def oldest_ms(self, stream: str) -> int | None:
        """Milliseconds timestamp of the oldest entry still in ``stream``, if any."""
        reply = await self.redis.xrange(stream, "-", "+", count=1)
        if not reply:
            return None
        return int(reply[0][0].split(b"-")[0])

    async def now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def length(self, stream: str) -> int:
        return int(await self.redis.xlen(stream))

    async def drop_idle_consumers(self, stream: str, group: str, *, min_idle_ms: int) -> int:
        """Forget consumers that hold nothing and have not read for a long while."""
        try:
            consumers = await self.redis.xinfo_consumers(stream, group)
        except redis.exceptions.ResponseError:
            return 0
        dropped = 0
        for c in consumers:
            if int(c["pending"]) == 0 and int(c["idle"]) >= min_idle_ms:
                await self.redis.xgroup_delconsumer(stream, group, c["name"])
                dropped += 1
        return dropped
