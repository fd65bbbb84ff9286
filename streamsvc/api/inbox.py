"""The Redis inbox: producers XADD ``op`` (operation JSON) and optionally ``key``.

Several processes share the inbox through one consumer group. Entries are read in bulk,
validated one by one, stored with one group commit, and acked only after that. An
operation without a userOperationId gets an id derived from its entry id, so an entry
delivered twice (after a crash before the ack) is still stored once. Entries that cannot
be accepted go to the rejects stream with the reason, and are acked.
"""

from __future__ import annotations

import time
import uuid

import anyio
import msgspec
import structlog

from streamsvc.actors.ingress import Ingress
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import translate
from streamsvc.backoff import pause
from streamsvc.errors import InvalidOperation
from streamsvc.keys import Authenticator
from streamsvc.model import Operation, Rejection, decode_error, derived_id, operation_decoder
from streamsvc.policy import RetryPolicy
from streamsvc.validate import Caller

log = structlog.get_logger("streamsvc.inbox")

_NAMESPACE = uuid.UUID("6c1f0c52-3c1e-4c55-9a55-5f0d3e0c9b11")
SOURCE = "inbox"


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
    ) -> None:
        self.name = name
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
        own_pending, failures, next_claim = True, 0, 0.0
        while not self.stopping:
            try:
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.claim_idle_ms / 2000
                    await self._take_over_idle(consumer)
                entries = await self.streams.read(
                    self.streams.names.inbox,
                    rs.INGRESS_GROUP,
                    consumer,
                    count=self.count,
                    block_ms=None if burst or own_pending else self.block_ms,
                    own_pending=own_pending,
                )
                if entries:
                    await self.ingest(entries)
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

    async def _take_over_idle(self, consumer: str) -> None:
        """Entries a dead inbox consumer read and never acked become ours."""
        names = self.streams.names
        entries = await self.streams.autoclaim(
            names.inbox,
            rs.INGRESS_GROUP,
            consumer,
            min_idle_ms=self.claim_idle_ms,
            count=self.count,
        )
        if entries:
            log.info("inbox.took_over_idle", entries=len(entries))
            await self.ingest(entries)

    async def ingest(self, entries: list[rs.Entry]) -> None:
        """Store every acceptable operation of ``entries``; reject the rest; ack all."""
        names = self.streams.names
        rejects: list[dict[str, bytes]] = []
        by_caller: dict[Caller, tuple[list[Operation], list[str | None], list[bytes]]] = {}
        for entry_id, fields in entries:
            raw = fields.get(b"op")
            try:
                if raw is None:
                    raise _Refused(Rejection("op", "entry has no `op` field"))
                if len(raw) > self.max_body_bytes:
                    reason = f"larger than the {self.max_body_bytes} bytes allowed"
                    raise _Refused(Rejection("op", reason))
                op = _decode(raw)
                caller = self.auth.caller_for(fields.get(b"key") or op.api_key)
            except _Refused as refused:
                rejects.append(_reject(entry_id, raw, refused.rejection))
                continue
            except InvalidOperation as exc:
                rejects.append(_reject(entry_id, raw, Rejection(exc.field, exc.reason)))
                continue
            ops, ids, entry_ids = by_caller.setdefault(caller, ([], [], []))
            ops.append(op)
            ids.append(derived_id(_NAMESPACE, f"{names.inbox}:{entry_id.decode()}"))
            entry_ids.append(entry_id)
        raw_by_id = {entry_id: fields.get(b"op") for entry_id, fields in entries}
        for caller, (ops, ids, entry_ids) in by_caller.items():
            admitted, refusal = await self.auth.admit_some(caller, len(ops))
            if refusal is not None:  # over the key's rate: the later entries are refused
                for entry_id in entry_ids[admitted:]:
                    rejection = Rejection("rate", refusal.reason)
                    rejects.append(_reject(entry_id, raw_by_id[entry_id], rejection))
                ops, ids = ops[:admitted], ids[:admitted]
                if not ops:
                    continue
            results = await self.ingress.submit(ops, caller=caller, source=SOURCE, ids=ids)
            for result in results:
                if isinstance(result, Rejection):
                    entry_id = entry_ids[result.index]
                    rejects.append(_reject(entry_id, raw_by_id[entry_id], result))
        if rejects:
            rejects.sort(key=lambda r: _order(r["entry"]))
            await self.streams.add(names.rejects, rejects)
            log.info("inbox.rejected", entries=len(rejects))
        await self.streams.ack(names.inbox, rs.INGRESS_GROUP, [eid for eid, _ in entries])


class _Refused(Exception):
    def __init__(self, rejection: Rejection) -> None:
        self.rejection = rejection


def _decode(raw: bytes) -> Operation:
    try:
        return operation_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _Refused(decode_error(exc)) from None


def _order(entry_id: bytes) -> tuple[int, ...]:
    return tuple(int(part) for part in entry_id.split(b"-"))


def _reject(entry_id: bytes, raw: bytes | None, rejection: Rejection) -> dict[str, bytes]:
    return {"entry": entry_id, "op": raw or b"", "reason": rejection.message.encode()}
