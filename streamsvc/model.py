"""The operation callers send, what the pipeline carries, and what it reports.

Every ingress path (RabbitMQ, HTTP, the Redis inbox) decodes the same ``Operation``; the
field names on the wire are the old NestJS service's camelCase ones.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
import uuid
from typing import Annotated, Any, Literal

import msgspec

Action = Literal["insert", "upsert", "update", "delete"]
Priority = Annotated[int, msgspec.Meta(ge=0, le=9)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Status(enum.StrEnum):
    UNPROCESSED = "UNPROCESSED"
    PROCESSING = "PROCESSING"
    SUCCESS = "SUCCESS"
    FAIL = "FAIL"


class BodyKind(enum.StrEnum):
    STRUCTURED = "structured"
    STATEMENT = "statement"
    LEGACY = "legacy"


class Operation(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    """One database operation, as a caller sends it."""

    operation_type: Label
    user_operation_id: uuid.UUID | None = None
    # structured body
    table: str | None = None
    action: Action | None = None
    values: dict[str, Any] | None = None
    key: dict[str, Any] | None = None
    # statement body (legacy when params is absent)
    sql: str | None = None
    params: list[Any] | None = None
    # scheduling and ordering: validated and stored; their behaviour comes later
    priority: Priority = 0
    run_at: dt.datetime | None = None
    delay_ms: NonNegative | None = None
    ordering_key: Label | None = None
    meta: Any = None
    # credentials may travel inside the body (NestJS callers put them in data)
    api_key: str | None = None

    @property
    def kind(self) -> BodyKind:
        if self.sql is None:
            return BodyKind.STRUCTURED
        return BodyKind.LEGACY if self.params is None else BodyKind.STATEMENT


class WorkOp(msgspec.Struct, array_like=True):
    """One stored operation travelling through the work stream."""

    id: str
    op: Operation


class Outcome(msgspec.Struct, rename="camel"):
    """What happened to one operation; the notifier relays these."""

    id: str
    operation_type: str
    status: Status
    error: str | None
    attempts: int
    batch_id: str | None
    meta: Any = None
    user_operation_id: str | None = None  # the caller's own id, when it gave one


def user_id(op: Operation) -> str | None:
    """The caller's userOperationId as events carry it."""
    return str(op.user_operation_id) if op.user_operation_id else None


class Receipt(msgspec.Struct, rename="camel"):
    """The answer to a submission: the stored operation's id and where it stands."""

    id: str
    operation_type: str
    status: Status
    created: bool


class Rejection(msgspec.Struct):
    """A refused operation: which field, and why. Nothing of it was stored."""

    field: str
    reason: str
    index: int = 0

    @property
    def message(self) -> str:
        return f"{self.field}: {self.reason}"


class OperationView(msgspec.Struct, rename="camel"):
    """A stored operation, as get-by-id returns it."""

    id: str
    operation_type: str
    status: Status
    error: str | None
    attempts: int
    priority: int
    source: str
    batch_id: str | None
    run_at: dt.datetime | None
    ordering_key: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    processed_at: dt.datetime | None
    operation: Operation


operation_decoder = msgspec.json.Decoder(Operation)
operations_decoder = msgspec.json.Decoder(list[Operation])
work_encoder = msgspec.msgpack.Encoder()
work_decoder = msgspec.msgpack.Decoder(list[WorkOp])
outcomes_decoder = msgspec.msgpack.Decoder(list[Outcome])
json_encoder = msgspec.json.Encoder()


def derived_id(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``, without building UUID objects (a hot path)."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def decode_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> Rejection:
    """Name the field a msgspec error points at: ``Expected `int` - at `$.priority```."""
    message = str(exc)
    head, sep, where = message.rpartition(" - at `$")
    path = where.rstrip("`").replace("[", ".").replace("]", "").strip(".") if sep else ""
    return rejection(head if sep else message, path)


def rejection(message: str, path: str = "") -> Rejection:
    """A Rejection for msgspec's ``message`` about the value at ``path`` (dotted)."""
    head = message
    named = _NAMED_FIELD.search(head)
    if named is not None:
        path = ".".join(p for p in (path, named["name"]) if p)
    return Rejection(field=path or "body", reason=_lower_first(head))


_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]+)`")


def _lower_first(text: str) -> str:
    if text[1:2].isupper():
        return text
    return text[:1].lower() + text[1:]
