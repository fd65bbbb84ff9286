"""Redis Streams: the inbox, the work stream, the outcome stream, rejects and dead letters.

Entries carry many operations each (msgpack lists), so one XADD, XREADGROUP or XACK moves
a whole batch. Acked entries are deleted at once: a stream holds only live work, which is
what lets the sweeper reason about what Redis still holds.

The streams that only grow (rejects, dead letters, outcomes) are trimmed by retention
(``trim``, docs/retention.md): entries older than the retention age, and past ``maxlen``
(STREAMSVC_STREAM_MAXLEN) every acknowledged one, but never an entry a consumer group has
not acknowledged. The rejects stream is also capped at each XADD (``MAXLEN ~``), oldest
first: anyone who can reach the inbox writes it, and nothing stored bounds it. The inbox
and the work streams are never trimmed: their unacked entries are operations not yet
stored or not yet applied.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from streamsvc.adapters import redis_writes
from streamsvc.model import WorkOp, work_encoder

CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

# Redis away, or refusing writes (out of memory, say): work stored in PostgreSQL waits for
# the sweeper rather than failing whoever enqueued it.
NOT_TAKEN: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, redis.exceptions.RedisError)

Entry = tuple[bytes, dict[bytes, bytes]]


class Consumer(NamedTuple):
    """One consumer of a group, as XINFO CONSUMERS tells it."""

    name: str
    pending: int  # entries delivered to it and not acked
    idle_ms: int  # since it last read or claimed


Taken = tuple[str, Entry]  # an entry and the stream it was taken from


@dataclass(frozen=True, slots=True)
class Names:
    """Every Redis key the service uses, under one prefix, as one shard sees them.

    The work streams (one per priority band) and the outcome stream belong to a shard: a
    flusher acks its work entries and adds their outcomes (and the operations released
    behind them) in one Redis transaction, so they share a slot. On one Redis with one
    shard they are ``<prefix>:work`` and ``<prefix>:outcomes``. With several shards, or in
    cluster mode, each shard's keys carry a hash tag, ``{<prefix>:<n>}:work``, and the tags
    are chosen so the shards' slots are spread evenly over the slot space (``shard_tag``):
    the masters of a cluster whose slots are split evenly hold a like share of them. The
    inbox, rejects, dead letters and liveness keys are the deployment's, one of each.
    """

    prefix: str
    shard: int = 0
    shard_count: int = 1
    tagged: bool = False

    @classmethod
    def layout(cls, prefix: str, *, shards: int = 1, cluster: bool = False) -> Names:
        """The names of shard 0 of a deployment (``shards`` lists them all)."""
        return cls(prefix, 0, shards, tagged=cluster or shards > 1)

    @property
    def shards(self) -> tuple[Names, ...]:
        """Every shard's names, shard 0 first."""
        return tuple(replace(self, shard=n) for n in range(self.shard_count))

    @property
    def _base(self) -> str:
        if not self.tagged:
            return self.prefix
        return "{" + shard_tag(self.prefix, self.shard, self.shard_count) + "}"

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
        """The shard's work stream of priority 0 (see ``work_of``)."""
        return f"{self._base}:work"

    def work_of(self, priority: int) -> str:
        """The shard's work stream of one priority band: ``<base>:work`` for 0,
        ``<base>:work:N`` for 1 to 9."""
        return self.work if priority == 0 else f"{self._base}:work:{priority}"

    @property
    def work_streams(self) -> tuple[str, ...]:
        """Every band's work stream of the shard, highest priority first."""
        return tuple(self.work_of(p) for p in PRIORITIES)

    @property
    def outcomes(self) -> str:
        """The shard's outcome stream."""
        return f"{self._base}:outcomes"

    @property
    def epoch(self) -> str:
        """A key in the shard's slot that names the data it was set on: gone, that Redis
        lost its data (streamsvc.actors.announcements)."""
        return f"{self._base}:epoch"

    def alive(self, process: str) -> str:
        """A process's liveness key, refreshed while it runs (streamsvc.actors.heartbeat)."""
        return f"{self.prefix}:alive:{process}"

    @property
    def capped(self) -> frozenset[str]:
        """The streams trimmed on every XADD: rejects only, which no consumer group of the
        service reads and anyone who reaches the inbox can grow."""
        return frozenset((self.rejects,))

    @property
    def trimmed(self) -> list[tuple[str, str]]:
        """The streams retention trims (``Streams.trim``), each with the label of its
        metric: every shard's outcome stream, never the inbox or a work stream."""
        outcomes = [("outcomes", shard.outcomes) for shard in self.shards]
        return [("rejects", self.rejects), ("dead", self.dead), *outcomes]


SLOTS = 16384  # Redis Cluster's hash slots


@functools.cache
def shard_tag(prefix: str, shard: int, shards: int) -> str:
    """The hash tag of shard ``shard`` of ``shards``: ``<prefix>:<n>`` for the smallest
    ``n`` whose slot lies in the shard's even part of the slot space, so that every
    process names the same keys and the shards' slots are evenly spread."""
    low, high = shard * SLOTS // shards, (shard + 1) * SLOTS // shards
    for n in itertools.count():
        tag = f"{prefix}:{n}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends


PRIORITIES = tuple(range(9, -1, -1))  # 9 (first) down to 0

INGRESS_GROUP = "ingress"
FLUSHER_GROUP = "flushers"
NOTIFIER_GROUP = "notifier"


def work_entries(
    names: Names, items: Sequence[WorkOp], chunk: int
) -> list[tuple[str, dict[Any, Any]]]:
    """``items`` as work-stream entries of at most ``chunk`` operations each, every one on
    its priority band's stream of ``names``' shard, in their order within a band."""
    return _entries(items, chunk, lambda: names, gathered=False)


# A work entry's field saying its operations already waited for company on their way in
# (an inbox reader's gathering): a flusher hands them on without gathering again
# (streamsvc.pacing).
GATHERED = "g"
_GATHERED_READ = GATHERED.encode()  # as a read entry's field name


def _entries(
    items: Sequence[WorkOp], chunk: int, shard: Callable[[], Names], *, gathered: bool
) -> list[tuple[str, dict[Any, Any]]]:
    """``items`` as work entries (``work_entries``), each on the stream of ``shard()``,
    marked ``GATHERED`` when they were."""
    mark = {GATHERED: "1"} if gathered else {}
    return [
        (shard().work_of(p), {"ops": work_encoder.encode(part), **mark})
        for p, part in _parts(items, chunk)
    ]


def gathered(fields: dict[bytes, bytes]) -> bool:
    """Whether a work entry, as read, says its operations already waited for company
    (``GATHERED``)."""
    return _GATHERED_READ in fields


def operations_in(fields: dict[bytes, bytes]) -> int:
    """How many operations a work entry holds, read from its msgpack array's header
    without decoding them (1 for an entry that holds no array: it is dead-lettered when
    decoded). The take script (``_TAKE``, in Lua) reads the header by the same rule:
    change both together."""
    raw = fields.get(b"ops", b"")
    head = raw[0] if raw else 0
    if 0x90 <= head <= 0x9F:  # fixarray
        return head - 0x90
    if head == 0xDC and len(raw) >= 3:  # array 16
        return int.from_bytes(raw[1:3], "big")
    if head == 0xDD and len(raw) >= 5:  # array 32
        return int.from_bytes(raw[1:5], "big")
    return 1


def _parts(items: Sequence[WorkOp], chunk: int) -> list[tuple[int, Sequence[WorkOp]]]:
    """``items`` by priority band, in parts of at most ``chunk``, in their order."""
    bands: dict[int, list[WorkOp]] = {}
    for item in items:
        bands.setdefault(item.op.priority, []).append(item)
    return [
        (priority, band[i : i + chunk])
        for priority, band in bands.items()
        for i in range(0, len(band), chunk)
    ]


def connect(url: str, *, cluster: bool = False) -> Any:
    """A client of one Redis, or (``cluster``) of the Redis Cluster ``url`` is a node of;
    a write on a connection closed meanwhile raises ConnectionError (redis_writes)."""
    redis_writes.install()
    if cluster:
        return RedisCluster.from_url(url, decode_responses=False, health_check_interval=30)
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30)


def open_streams(
    url: str, prefix: str, *, shards: int = 1, cluster: bool = False, maxlen: int = 100_000
) -> Streams:
    """Streams on a new client of ``url``'s Redis (or cluster), laid out in ``shards``
    shards under ``prefix``; the caller closes the client (``streams.redis.aclose()``)."""
    names = Names.layout(prefix, shards=shards, cluster=cluster)
    return Streams(connect(url, cluster=cluster), names, maxlen=maxlen)


class Streams:
    """Thin, typed wrappers over the stream commands the actors use, for one shard's
    streams (``names``); ``on`` gives another shard's, ``enqueue`` spreads new work over
    all of them."""

    def __init__(self, client: Any, names: Names, *, maxlen: int = 100_000) -> None:
        # redis-py's reply types are unions of every protocol's shapes; this class is where
        # replies get their real types, so the client is used untyped here.
        self.redis: Any = client
        self.names = names
        self.maxlen = maxlen
        self.cluster = isinstance(client, RedisCluster)
        self._capped = names.capped
        self._take = self.redis.register_script(_TAKE)
        self._trim = self.redis.register_script(_TRIM)
        self._turn = itertools.count()

    async def open(self) -> None:
        """In cluster mode, learn the cluster's nodes and slots now: redis-py's cluster
        client does so on first use, and first uses from many tasks at once race."""
        if self.cluster:
            await self.redis.initialize()

    def on(self, shard: Names) -> Streams:
        """The same client and scripts, on ``shard``'s streams."""
        other = copy.copy(self)
        other.names = shard
        return other

    def next_shard(self) -> Names:
        """The shard new work goes to: each in turn, so that every shard gets its share."""
        shards = self.names.shards
        return shards[next(self._turn) % len(shards)]

    def spread(
        self, items: Sequence[WorkOp], chunk: int, *, gathered: bool = False
    ) -> list[tuple[str, dict[Any, Any]]]:
        """``items`` as work entries (``work_entries``), each on the next shard in turn."""
        return _entries(items, chunk, self.next_shard, gathered=gathered)

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
        await self.ack_adding(group, {stream: ids}, [(then, fields) for fields in entries])

    async def enqueue(
        self, items: Sequence[WorkOp], chunk: int, *, log: Any, event: str, gathered: bool = False
    ) -> bool:
        """Put ``items`` on their priority bands' work streams, each entry on the next shard
        in turn (``spread``; marked ``GATHERED`` when they were). When Redis cannot take them
        (away, or refusing writes), log ``event`` and return False: they are stored and
        pending, so the sweeper re-enqueues them from PostgreSQL."""
        try:
            await self.add_each(self.spread(items, chunk, gathered=gathered))
        except NOT_TAKEN as exc:
            log.warning(
                event,
                error=str(exc),
                operations=len(items),
                next="stored; the sweeper re-enqueues them from PostgreSQL",
            )
            return False
        return True

    async def add_each(self, entries: Sequence[tuple[str, dict[Any, Any]]]) -> None:
        """Add each entry to its stream, in one round trip."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, fields in entries:
                self._xadd(pipe, stream, fields)
            await pipe.execute()

    async def ack_adding(
        self,
        group: str,
        acks: dict[str, list[bytes]],
        adds: Sequence[tuple[str, dict[Any, Any]]],
    ) -> None:
        """Atomically add each of ``adds`` to its stream and ack (and delete) ``acks``'
        entries of each stream.

        In a Redis Cluster one transaction holds the keys of one slot only: the adds to
        streams of other slots (the deployment's dead letters, beside a shard's streams)
        are made first, on their own, and the rest atomically after. A crash in between
        leaves those added and the entries unacked, to be handled again: at least once,
        never lost."""
        if self.cluster and acks:
            slot = key_slot(next(iter(acks)).encode())
            elsewhere = [(k, f) for k, f in adds if key_slot(k.encode()) != slot]
            await self.add_each(elsewhere)
            adds = [(k, f) for k, f in adds if key_slot(k.encode()) == slot]
        async with self.redis.pipeline(transaction=True) as pipe:
            for stream, fields in adds:
                self._xadd(pipe, stream, fields)
            for stream, ids in acks.items():
                if ids:
                    pipe.xack(stream, group, *ids)
                    pipe.xdel(stream, *ids)
            await pipe.execute()

    async def take(
        self,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        operations: int,
        per_entry: Sequence[float],
    ) -> list[Taken]:
        """New entries for ``consumer`` worth about ``operations`` operations, from
        ``streams`` in that order (the next stream only when one has too few), each stream's
        entries counted at its ``per_entry`` (operations per entry, as seen so far), in one
        round trip; at least one entry when any is there. A group Redis lost is made again,
        and the streams read once more."""
        args: list[str | float] = [group, consumer, operations, *per_entry]
        for _ in range(2):
            reply = await self._take(keys=list(streams), args=args)
            lost = [stream.decode() for stream, entries in reply if entries == b"NOGROUP"]
            for name in lost:
                await self.ensure_group(name, group)
            taken = [
                (stream.decode(), (entry_id, _fields(flat)))
                for stream, entries in reply
                if entries != b"NOGROUP"
                for entry_id, flat in entries
            ]
            if taken or not lost:
                return taken
        return []

    async def wait(
        self, streams: Sequence[str], group: str, consumer: str, *, count: int, block_ms: int
    ) -> list[Taken]:
        """Block until any of ``streams`` has new entries (at most ``block_ms``); those
        that came, taken for ``consumer`` (up to ``count`` from each stream)."""
        try:
            reply = await self.redis.xreadgroup(
                group, consumer, {s: ">" for s in streams}, count=count, block=block_ms
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            for stream in streams:
                await self.ensure_group(stream, group)
            return []
        return [
            (stream.decode(), (eid, fields or {}))
            for stream, entries in reply or []
            for eid, fields in entries
        ]

    async def idle_pending(
        self, stream: str, group: str, *, min_idle_ms: int, count: int, consumer: str | None = None
    ) -> list[tuple[bytes, int]]:
        """(entry id, times delivered) of entries unacked for at least ``min_idle_ms`` (held
        by ``consumer``, when given)."""
        try:
            rows = await self.redis.xpending_range(
                stream,
                group,
                min="-",
                max="+",
                count=count,
                idle=min_idle_ms,
                consumername=consumer,
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        return [(row["message_id"], int(row["times_delivered"])) for row in rows]

    async def pending_below(
        self, stream: str, group: str, end: bytes, *, count: int, min_idle_ms: int | None = None
    ) -> list[tuple[bytes, str]]:
        """(entry id, consumer) of the oldest ``count`` unacked entries older than ``end``
        (and unacked for at least ``min_idle_ms``, when given), oldest first."""
        try:
            rows = await self.redis.xpending_range(
                stream, group, min="-", max=b"(" + end, count=count, idle=min_idle_ms
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        return [(row["message_id"], _text(row["consumer"])) for row in rows]

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

    async def started_ms(self, key: str) -> int | None:
        """When the Redis that holds ``key`` started, in milliseconds by its own clock; None
        when it will not say (INFO renamed away, as some hosted ones do)."""
        at: dict[str, Any] = {}
        if self.cluster:
            at["target_nodes"] = self.redis.get_node_from_key(key)
        try:
            info = await self.redis.info("server", **at)
        except redis.exceptions.ResponseError:
            return None
        seconds, micros = await self.redis.time(**at)
        return int(seconds) * 1000 + int(micros) // 1000 - int(info["uptime_in_seconds"]) * 1000

    async def length(self, stream: str) -> int:
        return int(await self.redis.xlen(stream))

    async def trim(self, stream: str, *, age_ms: int) -> int:
        """Trim ``stream`` without dropping anything a consumer group has not acknowledged
        (see _TRIM): entries older than ``age_ms`` (0: none by age), and when it holds more
        than ``maxlen`` entries, every acknowledged one (a stream without groups: the oldest,
        down to ``maxlen``). How many entries went."""
        return int(await self._trim(keys=[stream], args=[age_ms, self.maxlen]))

    async def dead_consumers(self, stream: str, group: str) -> list[tuple[str, int]]:
        """(name, entries pending) of the consumers of ``group`` whose process's heartbeat
        expired (streamsvc.actors.heartbeat): its process died, or could not reach Redis
        for as long. A consumer named without its process is never among them."""
        dead: list[tuple[str, int]] = []
        alive: dict[str, bool] = {}
        for name, pending, _ in await self.consumers(stream, group):
            process = process_of(name)
            if process is None:
                continue
            if process not in alive:
                alive[process] = bool(await self.redis.exists(self.names.alive(process)))
            if not alive[process]:
                dead.append((name, pending))
        return dead

    async def claim_from_dead(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int,
        count: int,
        below: bytes | None = None,
    ) -> list[Entry]:
        """The entries the dead consumers of ``group`` hold (older than ``below``, when
        given), now ``consumer``'s. ``min_idle_ms``: a dead consumer's entries have been
        idle at least this long, and one claimed meanwhile by another live consumer (its
        idle time reset) is left to it."""
        claimed: list[Entry] = []
        for name, pending in await self.dead_consumers(stream, group):
            if not pending:
                continue
            held = await self.idle_pending(
                stream, group, min_idle_ms=min_idle_ms, count=count, consumer=name
            )
            ids = [e for e, _ in held if below is None or entry_order(e) < entry_order(below)]
            claimed += await self.claim(stream, group, consumer, min_idle_ms=min_idle_ms, ids=ids)
        return claimed

    async def consumers(self, stream: str, group: str) -> list[Consumer]:
        """Each consumer of ``group`` (none: no stream or group yet)."""
        try:
            found = await self.redis.xinfo_consumers(stream, group)
        except redis.exceptions.ResponseError:
            return []
        return [Consumer(_text(c["name"]), int(c["pending"]), int(c["idle"])) for c in found]

    async def drop_consumer(self, stream: str, group: str, consumer: str) -> None:
        """Forget ``consumer``, when it holds nothing (an entry it holds would be lost)."""
        if any(c.name == consumer and not c.pending for c in await self.consumers(stream, group)):
            await self.redis.xgroup_delconsumer(stream, group, consumer)

    async def drop_idle_consumers(self, stream: str, group: str, *, min_idle_ms: int) -> int:
        """Forget consumers that hold nothing and have not read for a long while."""
        dropped = 0
        for c in await self.consumers(stream, group):
            if not c.pending and c.idle_ms >= min_idle_ms:
                await self.redis.xgroup_delconsumer(stream, group, c.name)
                dropped += 1
        return dropped


def consumer_name(process: str, actor: str) -> str:
    """A consumer's name: its process's (whose heartbeat says whether it lives), then the
    actor's within it."""
    return f"{process}/{actor}"


def process_of(consumer: str) -> str | None:
    """The process a consumer belongs to (None: a name without one, from before
    heartbeats)."""
    process, slash, _ = consumer.rpartition("/")
    return process if slash else None


def entry_order(entry_id: bytes) -> tuple[int, ...]:
    """An entry id as Redis orders them."""
    return tuple(int(part) for part in entry_id.split(b"-"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields from a script's flat [name, value, ...] reply."""
    return dict(zip(flat[0::2], flat[1::2], strict=True))


# Read new entries for one consumer from the streams in KEYS, in order, until ARGV[3]
# operations are taken: XREADGROUP without BLOCK inside a script, so the streams are tried in
# one round trip and nothing is taken from a later stream while an earlier one had enough.
# How many entries to ask for is guessed from ARGV[3 + i], the operations per entry seen so
# far on KEYS[i]; what they hold is then counted exactly (an entry's `ops` field is a
# msgpack array: its header says how many), and a stream that had more is read again while
# operations are missing. The first entry is taken whatever it holds. A stream whose group
# is gone answers NOGROUP in place of its entries.
_TAKE = """
-- As operations_in (Python) counts them: change both together.
local function operations(entry)
    local fields = entry[2]
    if type(fields) ~= 'table' then return 1 end
    for j = 1, #fields - 1, 2 do
        if fields[j] == 'ops' then
            -- Anything else (a short or foreign value) counts as one: the flusher
            -- dead-letters what it cannot decode.
            local head, b1, b2, b3, b4 = string.byte(fields[j + 1], 1, 5)
            if head and head >= 0x90 and head <= 0x9f then return head - 0x90 end
            if head == 0xdc and b2 then return b1 * 256 + b2 end
            if head == 0xdd and b4 then return ((b1 * 256 + b2) * 256 + b3) * 256 + b4 end
            return 1
        end
    end
    return 1
end

local left = tonumber(ARGV[3])
local taken = 0
local reply = {}
for i, key in ipairs(KEYS) do
    local per = tonumber(ARGV[3 + i])
    local got = {}
    local failed = false
    while left > 0 do
        local count = math.floor(left / per + 0.5)
        if count < 1 then
            if taken > 0 then break end
            count = 1
        end
        local ok, read = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[1], ARGV[2],
                               'COUNT', count, 'STREAMS', key, '>')
        if not ok then
            failed = true
            break
        end
        if not (read and read[1]) then break end
        -- Redis answers {{stream, entries}}; fakeredis, which unit tests run,
        -- {stream, entries}
        local entries = type(read[1]) == 'table' and read[1][2] or read[2]
        for _, entry in ipairs(entries) do
            table.insert(got, entry)
            left = left - operations(entry)
        end
        taken = taken + #entries
        if #entries < count then break end
    end
    if failed then
        table.insert(reply, {key, 'NOGROUP'})
    elseif #got > 0 then
        table.insert(reply, {key, got})
    end
    if left <= 0 then break end
end
return reply
"""


# Trim one stream (KEYS[1]; one key, so Redis Cluster takes it) in one atomic step, never
# past an entry a consumer group still owes an ack for. ARGV[1]: entries older than this
# many milliseconds by Redis's clock may go (0: none by age); ARGV[2]: past this many
# entries, every acknowledged one may go. Returns how many went.
#
# A group's safe point is its oldest pending entry (XPENDING's summary), or, when nothing
# is pending, its last-delivered-id: everything below it was delivered and acknowledged,
# everything above it is still to be delivered. XTRIM MINID keeps the entries at or above
# its id, so the last delivered entry itself stays (one acknowledged entry too many, never
# one too few). The stream's safe point is the lowest over its groups, and the trim goes to
# the lower of that and the cut. A stream without groups owes no one: trimmed by age, then
# to ARGV[2] entries. Ids compare exactly (their two parts as digit strings), not as Lua's
# floating-point numbers.
_TRIM = """
local key = KEYS[1]
local age_ms = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
if redis.call('EXISTS', key) == 0 then return 0 end

local function less(x, y)
    if #x ~= #y then return #x < #y end
    return x < y
end
local function before(a, b)
    local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
    local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
    if a_ms ~= b_ms then return less(a_ms, b_ms) end
    return less(a_seq, b_seq)
end

local safe = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local point = info['last-delivered-id']
    if info['pending'] > 0 then
        point = redis.call('XPENDING', key, info['name'])[2]
    end
    if safe == nil or before(point, safe) then safe = point end
end

local cut = nil
if age_ms > 0 then
    local now = redis.call('TIME')
    local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - age_ms
    if ms > 0 then cut = string.format('%.0f-0', ms) end
end
local length = redis.call('XLEN', key)

if safe == nil then
    local trimmed = 0
    if cut then trimmed = redis.call('XTRIM', key, 'MINID', cut) end
    if length - trimmed > maxlen then
        trimmed = trimmed + redis.call('XTRIM', key, 'MAXLEN', maxlen)
    end
    return trimmed
end
if length > maxlen then
    cut = safe
elseif cut == nil then
    return 0
elseif before(safe, cut) then
    cut = safe
end
return redis.call('XTRIM', key, 'MINID', cut)
"""
