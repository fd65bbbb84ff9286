"""Pure: the statement of each shape of list page, and where a page starts and ends.

A list's filters decide which index can serve it (sql/007_list_indexes.sql), so each
shape gets a statement of its own, built from the fixed fragments below: only the
columns of the filters given appear, each compared with a bound parameter. One generic
statement (`$1 IS NULL OR submitted_by = $1 ...`) has one plan for every shape, which
cannot use any of those indexes.

Every index leads with the shape's equality filters, then status, then (created_at, id).
Without a status filter the statement reads one backward range per status, each sorted
and limited in a subquery of its own, and merges them (a Merge Append): a page reads
about ``limit`` index entries, never the rows before the cursor nor a rare filter's
misses. (Merged as one range with ``status = ANY(...)``, the entries would not come out
in (created_at, id) order, and PostgreSQL would sort all of them.)

A page's upper bound is one row comparison, ``(created_at, id) < ($2, $3)``: the lower
of ``until`` and the cursor. Given both, a backward index scan could start at either and
only skip the entries above the other one, however many.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Sequence
from typing import NamedTuple

from streamsvc.model import ListQuery, Status

EARLIEST = dt.datetime(1, 1, 2, tzinfo=dt.UTC)  # no since: every row is after this
LATEST = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)  # no until nor cursor: every row before
NIL = uuid.UUID(int=0)  # (t, NIL) is below every (t, id): created_at < t exactly

# The filters a list may have, in the order the statement's parameters follow $4.
FILTERS = ("submitted_by", "operation_type", "status")

# What a page returns (an OperationView's columns). The order is the table's own
# (created_at, b.id): "id" alone in an ORDER BY would name the text column below, which
# sorts by another order and no index has.
COLUMNS = """id, operation_type, status, error, attempts, priority, source, batch_id, run_at,
       ordering_key, created_at, updated_at, processed_at, body, paused, history"""

_BRANCH = """(SELECT b.id AS uid, b.id::text AS id, operation_type, status, error, attempts,
        priority, source, batch_id::text AS batch_id, run_at, ordering_key, created_at,
        updated_at, processed_at, body::text AS body, paused, history::text AS history
 FROM "BatchOperations" AS b
 WHERE {equal} AND created_at >= $1 AND (created_at, b.id) < ($2, $3)
 ORDER BY created_at DESC, b.id DESC
 LIMIT $4)"""


class Bounds(NamedTuple):
    """A page's rows: created at or after ``since``, and (created_at, id) below
    (``before``, ``before_id``)."""

    since: dt.datetime
    before: dt.datetime
    before_id: uuid.UUID


def bounds(query: ListQuery, after: tuple[dt.datetime, str] | None) -> Bounds:
    """Where a page of ``query`` lies, after the cursor position ``after``."""
    upper = (query.until, NIL) if query.until is not None else (LATEST, NIL)
    if after is not None:
        upper = min(upper, (after[0], uuid.UUID(after[1])))
    return Bounds(query.since or EARLIEST, *upper)


def filters(query: ListQuery, owner: str | None) -> list[tuple[str, str]]:
    """(column, value) of each filter ``query`` and ``owner`` give, in FILTERS order."""
    status = query.status.value if query.status is not None else None
    given = {"submitted_by": owner, "operation_type": query.operation_type, "status": status}
    return [(column, value) for column in FILTERS if (value := given[column]) is not None]


@functools.cache
def page_statement(columns: tuple[str, ...]) -> str:
    """The statement of a page filtered on ``columns`` (a subsequence of FILTERS): its
    parameters are since, before, before_id, limit, then each filter's value in turn."""
    if any(column not in FILTERS for column in columns) or list(columns) != sorted(
        columns, key=FILTERS.index
    ):
        raise ValueError(f"not a subsequence of {FILTERS}: {columns}")
    equal = [f"{column} = ${n}" for n, column in enumerate(columns, start=5)]
    statuses = [None] if "status" in columns else list(Status)
    branches = [
        _BRANCH.format(
            # Status names are this module's constants (model.Status), never a caller's text.
            equal=" AND ".join(equal if status is None else [*equal, f"status = '{status}'"]),
        )
        for status in statuses
    ]
    union = "\nUNION ALL\n".join(branches)
    order = "ORDER BY created_at DESC, uid DESC"
    return f"SELECT {COLUMNS}\nFROM (\n{union}\n) AS page\n{order}\nLIMIT $4"


def arguments(query: ListQuery, page: Bounds, given: Sequence[tuple[str, str]]) -> list[object]:
    """``page_statement``'s arguments, one more row than a page: it says whether a next
    page exists."""
    return [page.since, page.before, page.before_id, query.limit + 1, *(v for _, v in given)]
