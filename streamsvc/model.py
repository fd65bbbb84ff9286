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
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from streamsvc.errors import InvalidOperation

# What the doors accept, so that nothing stored can fail PostgreSQL, Redis or AMQP later
# (README, "Operations"): labels fit an AMQP short string, times a sane window, and JSON
# nests at most MAX_DEPTH levels of objects and arrays, the operation itself included.
MAX_DEPTH = 32
MAX_LABEL_BYTES = 255
# An outcome's topic routing key is `<operationType>.<STATUS>`, at most 255 bytes too: the
# type leaves room for the longest status with its dot (".CANCELLED").
MAX_TYPE_BYTES = MAX_LABEL_BYTES - len(".CANCELLED")
MAX_DELAY_MS = 366 * 24 * 3600 * 1000
EARLIEST_RUN_AT = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
RUN_AT_HORIZON = dt.timedelta(days=366)

T = TypeVar("T")
Action = Literal["insert", "upsert", "update", "delete"]
Priority = Annotated[int, msgspec.Meta(ge=0, le=9)]
Delay = Annotated[int, msgspec.Meta(ge=0, le=MAX_DELAY_MS)]
# Characters here, a cheap first bound; validate counts the UTF-8 bytes.
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL_BYTES)]


class Status(enum.StrEnum):
    UNPROCESSED = "UNPROCESSED"
    PROCESSING = "PROCESSING"
    SUCCESS = "SUCCESS"
    FAIL = "FAIL"
    CANCELLED = "CANCELLED"


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
    # scheduling and ordering (docs/scheduling.md)
    priority: Priority = 0
    run_at: dt.datetime | None = None
    delay_ms: Delay | None = None
    ordering_key: Label | None = None
    meta: Any = None
    # credentials may travel inside the body (NestJS callers put them in data)
    api_key: str | None = None
    # The W3C trace context the operation was taken in, set by the service from the
    # request's traceparent (streamsvc.tracing); whatever a caller sends here is replaced.
    traceparent: str | None = None

    @property
    def kind(self) -> BodyKind:
        if self.sql is None:
            return BodyKind.STRUCTURED
        return BodyKind.LEGACY if self.params is None else BodyKind.STATEMENT


class WorkOp(msgspec.Struct, array_like=True):
    """One stored operation travelling through the work stream."""

    id: str
    op: Operation


class Finished(msgspec.Struct, rename="camel"):
    """What happened to one operation, as its event (`batch_operation_finished`) says."""

    id: str
    operation_type: str
    status: Status
    error: str | None
    attempts: int
    batch_id: str | None
    meta: Any = None
    user_operation_id: str | None = None  # the caller's own id, when it gave one


class Outcome(Finished):
    """What happened to one operation, as the notifier gets it: its event's data, and the
    operation's trace context (streamsvc.tracing), which the event does not carry."""

    traceparent: str | None = None

    def event(self) -> Finished:
        return Finished(**{name: getattr(self, name) for name in Finished.__struct_fields__})


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


class Ending(msgspec.Struct, rename="camel"):
    """How a replayed operation ended before it was replayed."""

    status: Status
    error: str | None
    attempts: int
    batch_id: str | None
    ended_at: dt.datetime | None


class OperationView(msgspec.Struct, rename="camel"):
    """A stored operation, as get-by-id returns it. ``paused``: held back, pending, while
    its operationType is paused. ``history``: its earlier endings, when it was replayed."""

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
    paused: bool = False
    history: list[Ending] = msgspec.field(default_factory=list)


history_decoder = msgspec.json.Decoder(list[Ending])

MAX_PAGE = 1000
MAX_COUNT_WINDOW = dt.timedelta(days=31)
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)]


class ListQuery(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    """Which operations a list shows, newest first: filters, a page size, and where the
    previous page ended (its ``nextCursor``)."""

    status: Status | None = None
    operation_type: str | None = None
    since: dt.datetime | None = None  # created at or after
    until: dt.datetime | None = None  # created before
    limit: Limit = 100
    cursor: str | None = None


class OperationPage(msgspec.Struct, rename="camel"):
    """One page of a list; ``next_cursor`` asks for the next one (None: this is the last)."""

    items: list[OperationView]
    next_cursor: str | None


class CountQuery(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    """Which operations a count covers: those created in [since, until) (by default the
    day up to now; at most MAX_COUNT_WINDOW)."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None


class OperationCounts(msgspec.Struct, rename="camel"):
    """The operations created in [since, until): how many by status (every status, zeros
    included), and by operationType and status (the types that have any)."""

    since: dt.datetime
    until: dt.datetime
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]


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


def decode_operation(raw: bytes) -> Operation:
    """The operation in JSON ``raw``, as every door decodes it: nesting first, then msgspec.

    Raises InvalidOperation naming the field; never anything else for any input."""
    check_nesting(raw)
    return _decoded(operation_decoder, raw)


def decode_operations(raw: bytes) -> list[Operation]:
    """A JSON list of operations (bulk submissions), under the same checks."""
    check_nesting(raw, levels_above=1)
    return _decoded(operations_decoder, raw)


def _decoded(decoder: msgspec.json.Decoder[T], raw: bytes) -> T:
    try:
        return decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        refused = decode_error(exc)
        raise InvalidOperation(refused.field, refused.reason) from None


def check_nesting(raw: bytes, *, levels_above: int = 0) -> None:
    """Refuse JSON ``raw`` when an operation in it nests deeper than MAX_DEPTH levels.

    ``levels_above`` counts the containers around the operation (1 for a list of them).
    Runs before msgspec builds Python objects (it recurses, and fails at ~1,000 levels)."""
    path = too_deep(raw, MAX_DEPTH + levels_above)
    if path is not None:
        reason = f"nested deeper than {MAX_DEPTH} levels"
        raise InvalidOperation(field_of(path, levels_above), reason)


# A JSON string (and the colon that makes it a key), or a bracket or comma. Inside strings
# nothing counts, so a string is always consumed whole; one left open runs to the end of the
# input. A string must always match where it starts: a pattern that could fail there would
# be tried again from every escaped quote after it, quadratic in the input's length.
_STRING_BODY = rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*'
_TOKEN = re.compile(_STRING_BODY + rb'(?:"(\s*:)?|\\?\Z)|[\[\]{},]')


def too_deep(raw: bytes, limit: int) -> list[str | int] | None:
    """Pure: where JSON ``raw`` first opens more than ``limit`` nested objects and arrays
    (the keys and indexes leading there), or None when it never does.

    Iterative, and linear in ``len(raw)``: safe on any input, malformed JSON included
    (whose errors are left to the decoder)."""
    if raw.count(b"[") + raw.count(b"{") <= limit or _shallow(raw, limit):
        return None
    path: list[str | int] = []  # one label per open container: key, or index in a list
    arrays: list[bool] = []
    for match in _TOKEN.finditer(raw):
        token = match[0]
        first = token[:1]
        if first == b'"':
            if match[1] is not None and arrays and not arrays[-1]:
                path[-1] = _key(token[: match.start(1) - match.start()])
        elif first in b"[{":
            if len(arrays) == limit:
                return path
            arrays.append(first == b"[")
            path.append(0 if first == b"[" else "")
        elif first == b",":
            if arrays and arrays[-1]:
                path[-1] = int(path[-1]) + 1
        elif arrays:
            arrays.pop()
            path.pop()
    return None


_STRING = re.compile(_STRING_BODY + rb'(?:"|\\?\Z)')
_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _shallow(raw: bytes, limit: int) -> bool:
    """A quick sufficient test at C speed (bulk bodies hold many small objects): the
    brackets outside strings vanish after ``limit`` rounds of removing innermost pairs."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return True
        brackets = _PAIR.sub(b"", brackets)
    return not brackets


def _key(token: bytes) -> str:
    try:
        return str(msgspec.json.decode(token))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return token[1:-1].decode(errors="replace")


def field_of(path: list[str | int], levels_above: int = 0) -> str:
    """The field a nesting path is about: ``meta``, or ``3.meta`` inside a list; ``body``
    (or the index) when what nests is not an operation's field."""
    where = [str(p) for p in path[:levels_above]]
    name = path[levels_above : levels_above + 1]
    if name and isinstance(name[0], str) and name[0]:
        where.append(name[0])
    return ".".join(where) or "body"


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
