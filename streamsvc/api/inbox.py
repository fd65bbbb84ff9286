"""The Redis inbox: producers XADD ``op`` (operation JSON), optionally ``key`` and
``traceparent`` (with ``tracestate``: the entry's W3C trace context, streamsvc.tracing).

Several processes share the inbox through one consumer group. Entries are read in bulk,
validated one by one, stored with one group commit, and acked only after that. An
operation without a userOperationId gets an id derived from its entry id, so an entry
delivered twice (after a crash before the ack) is still stored once. Entries that cannot
be accepted go to the rejects stream with the reason (never with a key), and are acked.

Operations with an orderingKey are stored in the order of their entries, whichever reader
or process reads them: a reader holding any waits until every older entry other readers
hold is stored (acked) before it stores its own (``_older_first``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import anyio
import msgspec
import structlog

from streamsvc import tracing
from streamsvc.actors.heartbeat import abandoned_after_ms
from streamsvc.actors.ingress import Ingress
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import translate
from streamsvc.backoff import pause
from streamsvc.errors import InvalidOperation, TransientError
from streamsvc.keys import Authenticator
from streamsvc.model import (
    Operation,
    Receipt,
    Rejection,
    decode_operation,
    derived_id,
    json_encoder,
)
from streamsvc.pacing import Pacer
from streamsvc.policy import RetryPolicy
from streamsvc.validate import Caller

log = structlog.get_logger("streamsvc.inbox")

_NAMESPACE = uuid.UUID("6c1f0c52-3c1e-4c55-9a55-5f0d3e0c9b11")
SOURCE = "inbox"
_ORDER_POLL_S = 0.005  # how often a reader holding keyed operations looks at older entries


@dataclass(slots=True)
class _Read:
    """One inbox entry, decoded: its operation and caller, or why it is rejected."""

    entry_id: bytes
    op: Operation | None = None
    caller: Caller | None = None
    rejection: Rejection | None = None
    fields: dict[bytes, bytes] | None = None  # the entry's, for its trace context


class InboxConsumer:
    def __init__(
        self,
        name: str,
        ingress: Ingress,
        streams: rs.Streams,
        auth: Authenticator,
        retry: RetryPolicy,
        *,
        count: int,
        claim_idle_ms: int,
        max_body_bytes: int,
        readers: int = 1,
        block_ms: int = 1000,
        heartbeat_ms: int = 1000,
        pacer: Pacer | None = None,
    ) -> None:
        self.name = name
        # Its readers' (streamsvc.pacing): no caller waits on an inbox entry's ack.
        self.pacer = pacer or Pacer(0)
        self.heartbeat_ms = heartbeat_ms
        self.readers = readers
        self.ingress = ingress
        self.streams = streams
        self.auth = auth
        self.retry = retry
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.max_body_bytes = max_body_bytes
        self.block_ms = block_ms
        self.stopping = False

    async def run(self, *, burst: bool = False) -> None:
        """Ingest until stopped (or, in burst mode, until the inbox has nothing for us).

        Each reader is a consumer of its own in the group: while one reader's entries
        are being stored, the next reader's are read and validated."""
        async with anyio.create_task_group() as tg:
            for n in range(self.readers):
                tg.start_soon(self._read, f"{self.name}-{n}", burst)

    async def _read(self, consumer: str, burst: bool) -> None:
        """One reader's loop. Entries are acked only once stored, so any failure here (a
        server down) just means reading this reader's unacked entries again after a pause."""
        own_pending, failures, next_claim, next_dead = True, 0, 0.0, 0.0
        while not self.stopping:
            try:
                if time.monotonic() >= next_dead:
                    next_dead = time.monotonic() + self.heartbeat_ms / 1000
                    await self._take_over_dead(consumer)
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.claim_idle_ms / 2000
                    await self._take_over_idle(consumer)
                async with self.pacer.turn():
                    if not own_pending:
                        await self.pacer.gather()  # streamsvc.pacing
                    entries = await self.streams.read(
                        self.streams.names.inbox,
                        rs.INGRESS_GROUP,
                        consumer,
                        count=self.count,
                        block_ms=None if burst or own_pending else self.block_ms,
                        own_pending=own_pending,
                    )
                    if entries:
                        self.pacer.started(full=len(entries) >= self.count)
                if entries:
                    await self.ingest(entries, consumer)
                elif own_pending:
                    own_pending = False
                elif burst:
                    return
                failures = 0
            except Exception as exc:
                failures += 1
                own_pending = True
                await pause(
                    log,
                    "inbox.ingest_failed",
                    translate(exc),
                    self.retry,
                    failures,
                    "reading unacked entries again",
                )

    async def _take_over_dead(self, consumer: str, *, before: bytes | None = None) -> None:
        """Entries the readers of a dead process read and never acked become ours (only
        those older than the entry ``before``, when given): within seconds of its death."""
        entries = await self.streams.claim_from_dead(
            self.streams.names.inbox,
            rs.INGRESS_GROUP,
            consumer,
            min_idle_ms=abandoned_after_ms(self.heartbeat_ms),
            count=self.count,
            below=before,
        )
        if entries:
            log.info("inbox.took_over_dead", entries=len(entries))
            await self.ingest(entries, consumer)

    async def _take_over_idle(self, consumer: str, *, before: bytes | None = None) -> None:
        """Entries a dead inbox consumer read and never acked become ours (only those older
        than the entry ``before``, when given)."""
        names = self.streams.names
        if before is None:
            entries = await self.streams.autoclaim(
                names.inbox,
                rs.INGRESS_GROUP,
                consumer,
                min_idle_ms=self.claim_idle_ms,
                count=self.count,
            )
        else:
            idle = await self.streams.pending_below(
                names.inbox,
                rs.INGRESS_GROUP,
                before,
                count=self.count,
                min_idle_ms=self.claim_idle_ms,
            )
            entries = await self.streams.claim(
                names.inbox,
                rs.INGRESS_GROUP,
                consumer,
                min_idle_ms=self.claim_idle_ms,
                ids=[entry_id for entry_id, owner in idle if owner != consumer],
            )
        if entries:
            log.info("inbox.took_over_idle", entries=len(entries))
            await self.ingest(entries, consumer)

    async def ingest(self, entries: list[rs.Entry], consumer: str | None = None) -> None:
        """Store every acceptable operation of ``entries``; reject the rest; ack all.

        Whatever one entry holds, it is stored or rejected on its own: nothing in it makes
        the reader read the others again. Only a store that is away does (a transient
        error), and then for every entry, unacked. When any operation carries an
        orderingKey, the entries are stored oldest first, each once every older entry that
        another consumer than ``consumer`` (the reader holding these) holds is stored."""
        read = [self._decode(entry_id, fields) for entry_id, fields in entries]
        if consumer is None or all(r.op is None or r.op.ordering_key is None for r in read):
            await self._store(read)
            return
        read.sort(key=lambda r: rs.entry_order(r.entry_id))
        while read:
            ready = await self._older_first(consumer, read)
            if not ready:  # stopping: the rest stay unacked, for whoever takes them over
                return
            await self._store(read[:ready])
            read = read[ready:]

    async def _older_first(self, consumer: str, held: list[_Read]) -> int:
        """How many of ``held`` (oldest first) may be stored now: those older than every
        entry another consumer holds unacked. While another holds one older than all of
        them, wait for it to be stored; one whose reader's process died (or, for a reader
        named without its process, left idle for ``claim_idle_ms``) is taken over and
        stored first. None (0) once the process is stopping."""
        inbox = self.streams.names.inbox
        next_claim = next_dead = 0.0
        while True:
            # Below the last held entry, at most len(held) - 1 are ours: among the oldest
            # len(held) pending ones is the oldest of another consumer, if there is one.
            older = await self.streams.pending_below(
                inbox, rs.INGRESS_GROUP, held[-1].entry_id, count=len(held)
            )
            theirs = next((rs.entry_order(eid) for eid, owner in older if owner != consumer), None)
            if theirs is None:
                return len(held)
            ready = sum(rs.entry_order(r.entry_id) < theirs for r in held)
            if ready or self.stopping:
                return ready
            if time.monotonic() >= next_dead:
                next_dead = time.monotonic() + self.heartbeat_ms / 1000
                await self._take_over_dead(consumer, before=held[0].entry_id)
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + self.claim_idle_ms / 2000
                await self._take_over_idle(consumer, before=held[0].entry_id)
            await anyio.sleep(_ORDER_POLL_S)

    def _decode(self, entry_id: bytes, fields: dict[bytes, bytes]) -> _Read:
        op: Operation | None = None
        try:
            op = self._operation(fields)
            caller = self.auth.caller_for(fields.get(b"key") or op.api_key)
        except InvalidOperation as exc:
            return _Read(entry_id, op, rejection=Rejection(exc.field, exc.reason))
        except Exception as exc:
            log.exception("inbox.entry_failed", entry=entry_id.decode(), next="rejected")
            reason = f"could not be read: {type(exc).__name__}"
            return _Read(entry_id, op, rejection=Rejection("op", reason))
        return _Read(entry_id, op, caller, fields=fields)

    async def _store(self, read: list[_Read]) -> None:
        """Store the accepted operations of ``read``, reject the rest, ack every entry."""
        names = self.streams.names
        rejects: list[dict[str, bytes]] = []
        by_caller: dict[Caller, tuple[list[Operation], list[str | None], list[bytes]]] = {}
        intakes: dict[bytes, tracing.Intake] = {}
        for r in read:
            if r.rejection is not None:
                rejects.append(_reject(r.entry_id, r.op, r.rejection))
                continue
            assert r.op is not None and r.caller is not None  # what _decode accepted
            ops, ids, entry_ids = by_caller.setdefault(r.caller, ([], [], []))
            ops.append(r.op)
            ids.append(derived_id(_NAMESPACE, f"{names.inbox}:{r.entry_id.decode()}"))
            entry_ids.append(r.entry_id)
            if tracing.tracer is not None:  # one span per entry, its producer's child
                intakes[r.entry_id] = tracing.start_intake(SOURCE, r.fields or {}, bytes_keys=True)
        for caller, (ops, ids, entry_ids) in by_caller.items():
            admitted, refusal = await self.auth.admit_some(caller, len(ops))
            if refusal is not None:  # over the key's rate: the later entries are refused
                rejection = Rejection("rate", refusal.reason)
                for entry_id, op in zip(entry_ids[admitted:], ops[admitted:], strict=True):
                    rejects.append(_reject(entry_id, op, rejection))
                ops, ids = ops[:admitted], ids[:admitted]
                if not ops:
                    continue
            traces = [intakes[e].traceparent for e in entry_ids] if intakes else None
            try:
                results = await self.ingress.submit(
                    ops,
                    caller=caller,
                    source=SOURCE,
                    ids=ids,
                    traces=traces,
                    gathered=self.pacer.gathers,
                )
            except Exception as exc:
                if isinstance(translate(exc), TransientError):
                    for intake in intakes.values():
                        intake.finish(error=exc)
                    raise
                # Something in these entries fails beyond validation: find which, alone.
                results = [
                    await self._submit_alone(op, caller, op_id, i, trace)
                    for i, (op, op_id, trace) in enumerate(
                        zip(ops, ids, traces or [None] * len(ops), strict=True)
                    )
                ]
            for entry_id, result in zip(entry_ids, results, strict=False):
                if entry_id in intakes:
                    intakes.pop(entry_id).finish([result])
            for result in results:
                if isinstance(result, Rejection):
                    rejects.append(_reject(entry_ids[result.index], ops[result.index], result))
        for intake in intakes.values():  # refused by the rate limit
            intake.finish([Rejection("rate", "over the key's rate")])
        if rejects:
            rejects.sort(key=lambda r: rs.entry_order(r["entry"]))
            await self.streams.add(names.rejects, rejects)
            log.info("inbox.rejected", entries=len(rejects))
        await self.streams.ack(names.inbox, rs.INGRESS_GROUP, [r.entry_id for r in read])

    async def _submit_alone(
        self, op: Operation, caller: Caller, op_id: str | None, index: int, trace: str | None
    ) -> Receipt | Rejection:
        try:
            results = await self.ingress.submit(
                [op],
                caller=caller,
                source=SOURCE,
                ids=[op_id],
                traces=[trace],
                gathered=self.pacer.gathers,  # read with the others: it waited already
            )
            return results[0]
        except Exception as exc:
            error = translate(exc)
            if isinstance(error, TransientError):
                raise
            log.error("inbox.store_refused", id=op_id, error=str(error), next="rejected")
            return Rejection("op", f"could not be stored: {error}", index)

    def _operation(self, fields: dict[bytes, bytes]) -> Operation:
        """The entry's operation: its size checked before decoding, its nesting before
        msgspec builds anything."""
        raw = fields.get(b"op")
        if raw is None:
            raise InvalidOperation("op", "entry has no `op` field")
        if len(raw) > self.max_body_bytes:
            raise InvalidOperation("op", f"larger than the {self.max_body_bytes} bytes allowed")
        return decode_operation(raw)


def _reject(entry_id: bytes, op: Operation | None, rejection: Rejection) -> dict[str, bytes]:
    """A rejects entry: never a key. ``op`` is the operation without its apiKey, when the
    entry decoded into one (the raw field may hold a key anywhere, so it is not kept)."""
    fields = {"entry": entry_id, "reason": rejection.message.encode()}
    if op is not None:
        fields["op"] = json_encoder.encode(msgspec.structs.replace(op, api_key=None))
    return fields
