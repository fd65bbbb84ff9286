import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streamsvc.errors import ConfigError
from streamsvc.model import Operation
from streamsvc.schedules import (
    MAX_NAME_BYTES,
    MAX_TICKS,
    Schedule,
    due_on_start,
    latest_tick,
    next_tick,
    parse_schedules,
    tick_id,
    tick_operation,
    ticks_between,
)

OP = {"operationType": "PURGE", "table": "sessions", "action": "delete", "key": {"id": 1}}


def at(hour: int, minute: int = 0, second: int = 0, day: int = 1) -> dt.datetime:
    return dt.datetime(2025, 1, day, hour, minute, second, tzinfo=dt.UTC)


def one(cron: str, **operation: Any) -> str:
    """STREAMSVC_SCHEDULES text holding one schedule, ``s``."""
    return json.dumps({"s": {"cron": cron, "operation": {**OP, **operation}}})


def schedule(cron: str) -> Schedule:
    return parse_schedules(one(cron))["s"]


# -- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "  ", "{}"])
def test_unset_or_empty_holds_no_schedule(text: str) -> None:
    assert parse_schedules(text) == {}


def test_a_schedule_is_parsed_with_its_operation_template() -> None:
    text = json.dumps(
        {
            "purge": {"cron": "0  3 * * *", "operation": OP},
            "poll": {"cron": "*/30 * * * * *", "operation": {**OP, "priority": 5}},
        }
    )
    schedules = parse_schedules(text)
    assert list(schedules) == ["purge", "poll"]
    purge = schedules["purge"]
    assert (purge.name, purge.cron) == ("purge", "0 3 * * *")  # fields joined by one space
    assert purge.operation == msgspec.convert(OP, Operation)
    assert schedules["poll"].operation.priority == 5


def test_at_path_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "schedules.json"
    path.write_text(one("0 3 * * *"), encoding="utf-8")
    assert list(parse_schedules(f"@{path}")) == ["s"]
    assert list(parse_schedules(f" @ {path} ")) == ["s"]


def test_at_path_goes_through_read_file() -> None:
    read: list[str] = []

    def read_file(path: str) -> str:
        read.append(path)
        return one("0 3 * * *")

    assert list(parse_schedules("@conf/schedules.json", read_file=read_file)) == ["s"]
    assert read == ["conf/schedules.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "STREAMSVC_SCHEDULES (@{path}): cannot read the file: "),
        ("", "STREAMSVC_SCHEDULES (@{path}): input data was truncated; expected "),
        ('{"s": {"cron": "* * * *"}}', "STREAMSVC_SCHEDULES (@{path}): schedule 's': "),
    ],
)
def test_at_path_errors_name_the_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "schedules.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        parse_schedules(f"@{path}")
    assert str(info.value).startswith(message.format(path=path))


def test_at_without_a_path_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^STREAMSVC_SCHEDULES: give a file path after @$"):
        parse_schedules("@")


NOT_JSON = "STREAMSVC_SCHEDULES: "
IN_S = "STREAMSVC_SCHEDULES: schedule 's': "


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the whole value
        ('{"s": ', NOT_JSON + "input data was truncated; expected {"),
        ("[]", NOT_JSON + "expected `object`, got `array`; expected {"),
        ('"x"', NOT_JSON + "expected `object`, got `str`"),
        (
            '{"s": {"cron": "0 3 * * *", "operation": {"operationType": "A"}},'
            ' "s": {"cron": "0 4 * * *", "operation": {"operationType": "B"}}}',
            IN_S + "named more than once",
        ),
        # the entry
        ('{"s": 1}', IN_S + "expected `object`, got `int`"),
        ('{"s": {"cron": "0 3 * * *"}}', IN_S + "operation: object missing required field"),
        ('{"s": {"operation": {}}}', IN_S + "cron: object missing required field"),
        (
            '{"s": {"cron": "0 3 * * *", "operation": {"operationType": "A"}, "tz": "UTC"}}',
            IN_S + "tz: object contains unknown field `tz`",
        ),
        ('{"s": {"cron": 3, "operation": {}}}', IN_S + "cron: expected `str`, got `int`"),
        # the cron expression
        (one("* * * *"), IN_S + "cron: expected 5 fields (minute hour day month weekday) or 6"),
        (one("0 0 3 * * * 2030"), IN_S + "cron: expected 5 fields"),  # croniter's years: no
        (one("@daily"), IN_S + "cron: expected 5 fields"),
        (one(""), IN_S + "cron: expected 5 fields"),
        (one("60 * * * *"), IN_S + "cron: [60 * * * *] is not acceptable, out of range"),
        (one("* 24 * * *"), IN_S + "cron: [* 24 * * *] is not acceptable, out of range"),
        (one("60 * * * * *"), IN_S + "cron: [60 * * * * *] is not acceptable"),  # seconds
        (one("* * * * 8"), IN_S + "cron: [* * * * 8] is not acceptable"),
        (one("x * * * *"), IN_S + "cron: "),
        (one("0 0 30 2 *"), IN_S + "cron: matches no date"),
        (one("H * * * *"), IN_S + "cron: hashed (H) and random (R) values are not supported"),
        (one("0 R * * *"), IN_S + "cron: hashed (H) and random (R)"),
        (one("0 1,r(0-5) * * *"), IN_S + "cron: hashed (H) and random (R)"),
        # the operation
        ('{"s": {"cron": "0 3 * * *", "operation": 1}}', IN_S + "operation: expected `object`"),
        (
            one("0 3 * * *", userOperationId=str(uuid.uuid4())),
            IN_S + "operation.userOperationId: not allowed: each tick derives its own",
        ),
        (
            one("0 3 * * *", runAt="2025-01-01T00:00:00Z"),
            IN_S + "operation.runAt: not allowed: each tick runs at its own time",
        ),
        (one("0 3 * * *", delayMs=1000), IN_S + "operation.delayMs: not allowed: each tick"),
        (one("0 3 * * *", priority=10), IN_S + "operation.priority: expected `int` <= 9"),
        (one("0 3 * * *", action="merge"), IN_S + "operation.action: invalid enum value 'merge'"),
        (one("0 3 * * *", bogus=1), IN_S + "operation.bogus: object contains unknown field"),
        (one("0 3 * * *", operationType=""), IN_S + "operation.operationType: expected `str`"),
        (
            one("0 3 * * *", operationType="A\nB"),
            IN_S + "operation.operationType: contains a control character",
        ),
        (one("0 3 * * *", key={"id": "\x00"}), IN_S + "operation.key.id: contains a NUL"),
        (
            '{"s": {"cron": "0 3 * * *", "operation": {"operationType": "A", "meta": '
            + "[" * 40
            + "]" * 40
            + "}}}",
            IN_S + "operation.meta: nested deeper than 32 levels",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_schedule_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_schedules(text)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "the name is empty"),
        ("é" * (MAX_NAME_BYTES // 2 + 1), f"the name is longer than {MAX_NAME_BYTES} bytes"),
        ("night\nly", "the name contains a control character"),
        ("night\x7fly", "the name contains a control character"),
        ("night\x85ly", "the name contains a control character"),
    ],
)
def test_bad_names_are_refused(name: str, reason: str) -> None:
    text = json.dumps({name: {"cron": "0 3 * * *", "operation": OP}})
    with pytest.raises(ConfigError) as info:
        parse_schedules(text)
    assert str(info.value).startswith(f"STREAMSVC_SCHEDULES: schedule {name!r}: {reason}")


@pytest.mark.parametrize("name", ["a", "é" * (MAX_NAME_BYTES // 2), "nightly purge: sessions/é"])
def test_names_up_to_200_bytes_are_taken(name: str) -> None:
    text = json.dumps({name: {"cron": "0 3 * * *", "operation": OP}})
    assert list(parse_schedules(text)) == [name]


# -- ticks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "after", "until", "ticks"),
    [
        # five fields: minute hour day month weekday; `after` is excluded, `until` included
        ("*/15 * * * *", at(0), at(1), [at(0, 15), at(0, 30), at(0, 45), at(1)]),
        ("*/15 * * * *", at(0, 0, 1), at(0, 31), [at(0, 15), at(0, 30)]),
        ("0 3 * * *", at(0), at(0, day=3), [at(3), at(3, day=2)]),
        ("0 3 * * *", at(3), at(3), []),
        ("0 3 * * *", at(4), at(3), []),  # an empty range
        # six fields: the seconds come first
        ("*/20 * * * * *", at(0), at(0, 1), [at(0, 0, 20), at(0, 0, 40), at(0, 1)]),
        ("15 * * * * *", at(0), at(0, 2, 30), [at(0, 0, 15), at(0, 1, 15), at(0, 2, 15)]),
        ("30 5 0 * * *", at(0), at(1), [at(0, 5, 30)]),
    ],
)
def test_ticks_between(
    cron: str, after: dt.datetime, until: dt.datetime, ticks: list[dt.datetime]
) -> None:
    found = ticks_between(schedule(cron), after, until)
    assert found == ticks
    assert all(t.tzinfo is dt.UTC for t in found)


def test_ticks_are_read_in_utc_whatever_the_inputs_zone() -> None:
    plus5 = dt.timezone(dt.timedelta(hours=5))
    after = dt.datetime(2025, 1, 1, 5, 0, tzinfo=plus5)  # 00:00 UTC
    until = dt.datetime(2025, 1, 2, 5, 0, tzinfo=plus5)
    assert ticks_between(schedule("0 3 * * *"), after, until) == [at(3)]
    assert next_tick(schedule("0 3 * * *"), after) == at(3)


def test_ticks_between_returns_at_most_the_limit_earliest_first() -> None:
    every_second = schedule("* * * * * *")
    ticks = ticks_between(every_second, at(0), at(0, day=2))
    assert len(ticks) == MAX_TICKS
    assert (ticks[0], ticks[-1]) == (at(0, 0, 1), at(0) + dt.timedelta(seconds=MAX_TICKS))
    rest = ticks_between(every_second, ticks[-1], at(0, day=2), limit=3)
    assert rest == [ticks[-1] + dt.timedelta(seconds=s) for s in (1, 2, 3)]


@pytest.mark.parametrize(
    ("cron", "after", "tick"),
    [
        ("0 3 * * *", at(0), at(3)),
        ("0 3 * * *", at(3), at(3, day=2)),  # strictly after
        ("0 3 * * *", at(2, 59, 59) + dt.timedelta(microseconds=999_999), at(3)),
        ("15 * * * * *", at(0, 0, 15), at(0, 1, 15)),  # seconds first: minute 0..59, second 15
        ("0 0 29 2 *", at(0), dt.datetime(2028, 2, 29, tzinfo=dt.UTC)),
    ],
)
def test_next_tick(cron: str, after: dt.datetime, tick: dt.datetime) -> None:
    assert next_tick(schedule(cron), after) == tick


@pytest.mark.parametrize(
    ("now", "tick"),
    [
        (at(10, 30), at(10)),
        (at(10), at(10)),  # a tick at `now` counts
        (at(10) - dt.timedelta(microseconds=1), at(9)),
        (at(10, 0, 0) + dt.timedelta(microseconds=999_999), at(10)),
    ],
)
def test_latest_tick_is_at_or_before_now(now: dt.datetime, tick: dt.datetime) -> None:
    assert latest_tick(schedule("0 * * * *"), now) == tick


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_tick(schedule("0 3 * * *"), dt.datetime(2025, 1, 1))


# -- the missed-tick rule ----------------------------------------------------------------

HOURLY = "0 * * * *"


@pytest.mark.parametrize(
    ("last_tick", "now", "due"),
    [
        (None, at(10, 30), None),  # never recorded: nothing missed, it starts from now
        (at(10), at(10, 30), None),  # recorded at the latest tick: nothing missed
        (at(9), at(10, 30), at(10)),  # one tick missed: it runs
        (at(5), at(10, 30), at(10)),  # five missed: the latest runs, once
        (at(10, day=1), at(10, 30, day=3), at(10, day=3)),  # two days down: still one run
        (at(10), at(11), at(11)),  # the latest tick is `now` itself
        (at(11), at(10, 30), None),  # recorded ahead of this clock: nothing to catch up
    ],
)
def test_the_latest_missed_tick_runs_once_on_start(
    last_tick: dt.datetime | None, now: dt.datetime, due: dt.datetime | None
) -> None:
    assert due_on_start(schedule(HOURLY), last_tick, now) == due


def test_missed_ticks_with_seconds() -> None:
    every_20s = schedule("*/20 * * * * *")
    assert due_on_start(every_20s, at(0), at(0, 1, 5)) == at(0, 1)
    assert due_on_start(every_20s, at(0, 1), at(0, 1, 5)) is None


# -- one id per tick ---------------------------------------------------------------------


def test_tick_id_is_stable_across_processes_and_releases() -> None:
    # A different derivation would submit every tick again around an upgrade.
    assert tick_id("purge", at(3)) == "6893429e-d734-5bac-9af1-903d8e97c520"
    assert tick_id("purge", at(3)) == tick_id("purge", at(3))
    assert uuid.UUID(tick_id("purge", at(3))).version == 5


def test_tick_id_is_the_same_instant_in_any_zone() -> None:
    plus5 = dt.timezone(dt.timedelta(hours=5))
    assert tick_id("purge", at(3)) == tick_id("purge", at(3).astimezone(plus5))


@pytest.mark.parametrize(
    ("other_name", "other_tick"),
    [
        ("purge2", at(3)),  # another schedule
        ("purge", at(3, day=2)),  # another tick
        ("purge", at(3, 0, 1)),
        ("purge:", at(3)),  # names cannot bleed into the time
        ("", at(3)),
    ],
)
def test_tick_ids_differ_per_name_and_tick(other_name: str, other_tick: dt.datetime) -> None:
    assert tick_id("purge", at(3)) != tick_id(other_name, other_tick)


def test_tick_operation_is_the_template_with_the_ticks_id_and_time() -> None:
    nightly = schedule("0 3 * * *")
    op = tick_operation(nightly, at(3))
    assert op.user_operation_id == uuid.UUID(tick_id("s", at(3)))
    assert op.run_at == at(3)
    assert msgspec.structs.replace(op, user_operation_id=None, run_at=None) == nightly.operation
    assert nightly.operation.user_operation_id is None and nightly.operation.run_at is None
