"""Pure: what a list or a count of operations may ask for, checked before it reaches the
store. Every refusal is an InvalidOperation naming the field (the wire's name) and the
reason, as an operation's are; HTTP, RPC and the CLI answer them the same way.

Times without a zone are read as UTC, as runAt is: the memory store compares them with
aware times, and PostgreSQL would read them in the session's zone. A time that cannot be
expressed in UTC (an offset past year 1 or 9999) is out of range, not a server error.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from streamsvc.errors import InvalidOperation
from streamsvc.model import MAX_COUNT_WINDOW, MAX_TYPE_BYTES, CountQuery, ListQuery
from streamsvc.validate import label

DEFAULT_COUNT_WINDOW = dt.timedelta(days=1)


def list_query(query: ListQuery) -> ListQuery:
    """``query`` with its times in UTC; refused when a filter could not match anything a
    caller may store, or its window is empty."""
    if query.operation_type is not None:  # reaches PostgreSQL as text: no NUL, a label's size
        label("operationType", query.operation_type, MAX_TYPE_BYTES)
    since = utc("since", query.since)
    until = utc("until", query.until)
    if since is not None and until is not None and until <= since:
        raise InvalidOperation("until", "must be after since")
    return msgspec.structs.replace(query, since=since, until=until)


def count_window(query: CountQuery, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """[since, until) of a count: until defaults to ``now``, since to a day before until."""
    until = utc("until", query.until) or now
    since = utc("since", query.since) or _minus(until, DEFAULT_COUNT_WINDOW)
    if until <= since:
        raise InvalidOperation("until", "must be after since")
    if until - since > MAX_COUNT_WINDOW:
        raise InvalidOperation("since", f"at most {MAX_COUNT_WINDOW.days} days before until")
    return since, until


def utc(field: str, value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
    except OverflowError:
        raise InvalidOperation(field, "out of range") from None


def _minus(moment: dt.datetime, span: dt.timedelta) -> dt.datetime:
    try:
        return moment - span
    except OverflowError:
        raise InvalidOperation("until", "out of range") from None
