"""A list's statement per shape and its bounds (streamsvc.store.listing), and what a list
or a count may ask for (streamsvc.filters). Whether PostgreSQL plans each shape on its
index: tests/integration/test_list_plans.py."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import msgspec
import pytest

from streamsvc import filters
from streamsvc.errors import InvalidOperation
from streamsvc.model import CountQuery, ListQuery, Status
from streamsvc.store import listing

T0 = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
ID = "7f1d9a8e-7c2b-4e4f-8a61-0d9c4b7e2f15"


@pytest.mark.parametrize(
    ("query", "owner", "columns", "branches"),
    [
        (ListQuery(), None, (), 5),
        (ListQuery(), "a", ("submitted_by",), 5),
        (ListQuery(status=Status.FAIL), None, ("status",), 1),
        (ListQuery(operation_type="T"), None, ("operation_type",), 5),
        (ListQuery(status=Status.FAIL), "a", ("submitted_by", "status"), 1),
        (ListQuery(operation_type="T"), "a", ("submitted_by", "operation_type"), 5),
        (
            ListQuery(status=Status.FAIL, operation_type="T"),
            "a",
            ("submitted_by", "operation_type", "status"),
            1,
        ),
    ],
)
def test_each_shape_compares_only_its_filters_each_with_a_parameter(
    query: ListQuery, owner: str | None, columns: tuple[str, ...], branches: int
) -> None:
    given = listing.filters(query, owner)
    assert tuple(column for column, _ in given) == columns
    sql = listing.page_statement(columns)
    assert sql.count('FROM "BatchOperations"') == branches
    for n, column in enumerate(columns, start=5):
        assert sql.count(f"{column} = ${n}") == branches
    assert f"${5 + len(columns)}" not in sql
    literal = set(re.findall(r"status = '([A-Z]+)'", sql))
    assert literal == (set() if "status" in columns else {s.value for s in Status})
    assert "IS NULL" not in sql and "OFFSET" not in sql.upper()
    page = listing.bounds(query, None)
    args = listing.arguments(query, page, given)
    assert args[3] == query.limit + 1 and len(args) == 4 + len(columns)


def test_a_statement_is_built_only_from_known_columns_in_order() -> None:
    for columns in (("status", "submitted_by"), ("body",), ("submitted_by; DROP",)):
        with pytest.raises(ValueError):
            listing.page_statement(columns)


@pytest.mark.parametrize(
    ("until", "after", "upper"),
    [
        (None, None, (listing.LATEST, listing.NIL)),
        (T0, None, (T0, listing.NIL)),
        (None, (T0, ID), (T0, uuid.UUID(ID))),
        (T0, (T0 - dt.timedelta(seconds=1), ID), (T0 - dt.timedelta(seconds=1), uuid.UUID(ID))),
        (T0, (T0 + dt.timedelta(seconds=1), ID), (T0, listing.NIL)),  # until is the lower
        (T0, (T0, ID), (T0, listing.NIL)),  # the same time: until excludes it already
    ],
)
def test_a_page_ends_at_the_lower_of_until_and_the_cursor(
    until: dt.datetime | None,
    after: tuple[dt.datetime, str] | None,
    upper: tuple[dt.datetime, uuid.UUID],
) -> None:
    page = listing.bounds(ListQuery(until=until), after)
    assert (page.before, page.before_id) == upper
    assert page.since == listing.EARLIEST


def test_a_lists_times_are_read_as_utc_and_its_window_must_not_be_empty() -> None:
    naive = filters.list_query(ListQuery(since=dt.datetime(2026, 1, 1)))
    assert naive.since == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    zoned = dt.datetime(2026, 1, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert filters.list_query(ListQuery(until=zoned)).until == dt.datetime(
        2026, 1, 1, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    ("query", "field", "reason"),
    [
        (ListQuery(operation_type="A\x00B"), "operationType", "control character"),
        (ListQuery(operation_type="x" * 300), "operationType", "longer than"),
        (ListQuery(since=T0, until=T0), "until", "after since"),
        (
            ListQuery(since=dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))),
            "since",
            "out of range",
        ),
        (
            ListQuery(
                until=dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(-dt.timedelta(hours=5)))
            ),
            "until",
            "out of range",
        ),
    ],
)
def test_a_list_refuses_what_no_stored_operation_could_match(
    query: ListQuery, field: str, reason: str
) -> None:
    with pytest.raises(InvalidOperation, match=reason) as refused:
        filters.list_query(query)
    assert refused.value.field == field


def test_a_count_defaults_to_the_day_up_to_now_and_spans_at_most_31_days() -> None:
    assert filters.count_window(CountQuery(), T0) == (T0 - dt.timedelta(days=1), T0)
    since = T0 - dt.timedelta(days=31)
    assert filters.count_window(CountQuery(since=since), T0) == (since, T0)
    for query, field in (
        (CountQuery(since=since - dt.timedelta(seconds=1)), "since"),
        (CountQuery(since=T0, until=T0), "until"),
        (CountQuery(until=dt.datetime(1, 1, 1, 12, tzinfo=dt.UTC)), "until"),  # until - 1 day
    ):
        with pytest.raises(InvalidOperation) as refused:
            filters.count_window(query, T0)
        assert refused.value.field == field


def test_a_count_query_names_its_fields_in_camel_case() -> None:
    assert msgspec.json.encode(CountQuery(since=T0)) == b'{"since":"2026-11-30T12:00:00Z"}'
