"""What the store takes and returns: small typed records, never tuples read by index."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import uuid
from typing import Literal

import msgspec

from streamsvc.errors import InvalidOperation
from streamsvc.model import Operation, OperationView, Outcome, Status, WorkOp

REPLAYABLE = (Status.FAIL, Status.CANCELLED)
HISTORY_KEPT = 50  # a replayed operation's last endings (sql/005_queue_management.sql)


class NewOperation(msgspec.Struct, frozen=True):
    """One accepted operation for the next group commit."""

    id: str
    op: Operation
    source: str
    submitted_by: str
    run_at: dt.datetime | None = None  # runAt, or delayMs from the time it was accepted


class Intake(msgspec.Struct):
    """What a group commit stored.

    ``created``: ids stored now (the others were stored before). ``refused``: positions in
    the group PostgreSQL would not store, with the reason. ``ready``: the operations to put
    on the work streams now; the others wait for their runAt, or for their key's earlier
    operations (see docs/scheduling.md)."""

    created: set[str]
    refused: dict[int, str]
    ready: list[WorkOp]


class State(msgspec.Struct, frozen=True):
    """Where one stored operation stands."""

    id: str
    operation_type: str
    status: Status
    error: str | None
    attempts: int
    batch_id: str | None


class Applied(msgspec.Struct):
    """What one batch transaction decided.

    ``outcomes``: the operations it finished (applied, or refused by the database).
    ``earlier``: those an earlier transaction finished, reported again, applied never.
    ``released``: operations whose turn came when their key's earlier one finished, to put
    on the work streams."""

    batch_id: str
    outcomes: list[Outcome] = msgspec.field(default_factory=list)
    earlier: list[Outcome] = msgspec.field(default_factory=list)
    released: list[WorkOp] = msgspec.field(default_factory=list)


class Ended(msgspec.Struct):
    """Operations ended without being applied (FAIL after retries, dead-lettered, or
    CANCELLED), and those whose turn came because of it."""

    outcomes: list[Outcome] = msgspec.field(default_factory=list)
    released: list[WorkOp] = msgspec.field(default_factory=list)


class Due(msgspec.Struct, frozen=True):
    """An operation a scheduler took: put it on a work stream in ``wait_s`` seconds."""

    work: WorkOp
    wait_s: float


class Failure(msgspec.Struct, frozen=True):
    id: str
    operation_type: str
    error: str | None
    processed_at: dt.datetime | None


class Announced(msgspec.Struct, frozen=True):
    """How far the outcome events are known to be on their way (sql/008_announced.sql):
    every operation that finished before ``before`` had its outcome relayed, and Redis was
    seen holding the data this was measured on at ``seen``."""

    before: dt.datetime
    seen: dt.datetime


class Summary(msgspec.Struct):
    """Counts for `streamsvc status`."""

    statuses: dict[str, int]
    finished_per_s: float
    failures: list[Failure]


CancelVerdict = Literal["cancelled", "finished", "unknown"]


class Cancelled(msgspec.Struct):
    """What a cancel request found: ``cancelled`` (now, or before), ``finished`` (applied
    or failed: too late), or ``unknown`` (no such operation the caller may see); and the
    operation as it stands after (``Ingress.cancel`` reads it for the answer)."""

    verdict: CancelVerdict
    view: OperationView | None = None
    outcome: Outcome | None = None
    released: list[WorkOp] = msgspec.field(default_factory=list)


class Replayed(msgspec.Struct):
    """What a replay changed: ``ids`` pending again; ``ready`` to put on the work streams
    now (the others wait for their runAt, or for their key's earlier operations)."""

    ids: list[str] = msgspec.field(default_factory=list)
    ready: list[WorkOp] = msgspec.field(default_factory=list)


RetryVerdict = Literal["replayed", "pending", "succeeded", "unknown"]


class Retried(msgspec.Struct):
    """What a retry request found: ``replayed`` (it had ended FAIL or CANCELLED),
    ``pending`` (not finished: nothing to retry), ``succeeded`` (applied once, never
    again), or ``unknown`` (no such operation the caller may see); and the operation as it
    stands after."""

    verdict: RetryVerdict
    view: OperationView | None = None
    ready: list[WorkOp] = msgspec.field(default_factory=list)

    @property
    def why_not(self) -> str:
        """Why a found operation was not replayed, as every door words it."""
        if self.verdict == "succeeded":
            return "it succeeded and is never applied twice"
        status = self.view.status.value if self.view is not None else "pending"
        return f"it is {status}: not finished, nothing to retry"


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """Which finished operations a replay takes: ended with one of ``statuses``, of
    ``operation_type`` (None: any), ended in [``since``, ``until``), submitted by
    ``owner`` (None: anyone)."""

    statuses: tuple[Status, ...] = REPLAYABLE
    operation_type: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    owner: str | None = None


class PausedType(msgspec.Struct, frozen=True, rename="camel"):
    """A paused operationType: who paused it, when, and how many operations it holds."""

    operation_type: str
    paused_by: str
    paused_at: dt.datetime
    held: int


def encode_cursor(created_at: dt.datetime, op_id: str, owner: str | None) -> str:
    """Where a page ended, opaque to callers: the last item's creation time and id, and
    whose list it is (``owner``; None: everyone's). A cursor is a position, never a grant:
    the list's scope always comes from the caller's key."""
    stamp = created_at.astimezone(dt.UTC).isoformat()
    return base64.urlsafe_b64encode(f"{stamp}|{op_id}|{_scope_tag(owner)}".encode()).decode()


def decode_cursor(cursor: str, owner: str | None) -> tuple[dt.datetime, str]:
    """``encode_cursor``'s position, for the list of ``owner``; InvalidOperation naming
    ``cursor`` for anything else, another caller's cursor included."""
    refused = InvalidOperation("cursor", "not a cursor this service gave")
    try:
        stamp, op_id, tag = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        created_at = dt.datetime.fromisoformat(stamp)
        uuid.UUID(op_id)
        if created_at.tzinfo is None:
            raise refused
        created_at = created_at.astimezone(dt.UTC)
    except (ValueError, OverflowError, binascii.Error, UnicodeError) as exc:
        raise refused from exc
    if not hmac.compare_digest(tag, _scope_tag(owner)):
        raise InvalidOperation("cursor", "given for another caller's list")
    return created_at, op_id


def _scope_tag(owner: str | None) -> str:
    """Whose list a cursor belongs to, without the key's name in it."""
    scope = "*" if owner is None else f"={owner}"
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


class Minute(msgspec.Struct, frozen=True):
    """Operations that finished in the minute starting at ``start``."""

    start: dt.datetime
    finished: int
