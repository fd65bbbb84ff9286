"""Pure: recurring operations, from STREAMSVC_SCHEDULES to the operation each tick submits.

``STREAMSVC_SCHEDULES`` is a JSON object, or ``@path`` to a file holding one::

    {"<name>": {"cron": "<5 fields, or 6 with seconds first>", "operation": {...}}}

Cron expressions are read in UTC. Five fields are classic cron (minute hour day-of-month
month day-of-week); six put a seconds field first (``*/30 * * * * *``: every 30 seconds).

The invariant kept here: every process computes the same ticks for a schedule and submits
each tick under the same userOperationId (``tick_id``), so the ingress stores a tick once
however many processes submit it. Nothing here reads a clock or talks to a server; the only
I/O is ``parse_schedules`` reading the ``@path`` file, through ``read_file``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from croniter import CroniterBadDateError, croniter

from streamsvc.errors import ConfigError, InvalidOperation
from streamsvc.model import EARLIEST_RUN_AT, Operation, decode_error, decode_operation, derived_id
from streamsvc.validate import storable

SETTING = "STREAMSVC_SCHEDULES"
MAX_NAME_BYTES = 200
# Most ticks one ticks_between call returns (the earliest ones); ask again from the last.
MAX_TICKS = 1000
_NAMESPACE = uuid.UUID("8d0c6a51-2f4e-5b7a-9c3d-e1f2a4b6c8d0")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# croniter's hashed (H) and random (R) values: R differs per process, H needs a hash id.
_HASHED = re.compile(r"^[hr](\(|/|$)", re.IGNORECASE)


class Schedule(msgspec.Struct, frozen=True):
    """One recurring operation: ``operation`` is submitted at every tick of ``cron``."""

    name: str
    cron: str  # its fields joined by one space
    operation: Operation  # the template: no userOperationId, runAt or delayMs


class _Entry(msgspec.Struct, forbid_unknown_fields=True):
    cron: str
    operation: msgspec.Raw


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def parse_schedules(
    text: str, *, read_file: Callable[[str], str] = _read_text
) -> dict[str, Schedule]:
    """The schedules in a STREAMSVC_SCHEDULES value: inline JSON, or ``@path`` to a file of
    it (read with ``read_file``; relative to the working directory). Empty: no schedules.

    Raises ConfigError naming the setting, the schedule and the field at fault."""
    text = text.strip()
    setting = SETTING
    if text.startswith("@"):
        path = text[1:].strip()
        if not path:
            raise ConfigError(f"{SETTING}: give a file path after @")
        setting = f"{SETTING} (@{path})"
        try:
            text = read_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{setting}: cannot read the file: {exc}") from None
    elif not text:
        return {}
    try:
        entries = msgspec.json.decode(text, type=dict[str, msgspec.Raw])
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(
            f"{setting}: {decode_error(exc).reason}; expected "
            '{"<name>": {"cron": "<cron>", "operation": {...}}}'
        ) from None
    twice = _repeated_name(text)
    if twice is not None:
        raise ConfigError(f"{setting}: schedule {twice!r}: named more than once")
    return {name: _schedule(setting, name, bytes(raw)) for name, raw in entries.items()}


def _repeated_name(text: str) -> str | None:
    """A name the top-level object holds twice (msgspec keeps the last one silently)."""
    objects: list[list[tuple[str, Any]]] = []
    try:
        json.loads(text, object_pairs_hook=objects.append)  # the outermost object closes last
    except (ValueError, RecursionError):  # too deep for json: decode_operation refuses it
        return None
    seen: set[str] = set()
    for name, _ in objects[-1]:
        if name in seen:
            return name
        seen.add(name)
    return None


def _schedule(setting: str, name: str, raw: bytes) -> Schedule:
    where = f"{setting}: schedule {name!r}"
    _check_name(where, name)
    try:
        entry = msgspec.json.decode(raw, type=_Entry)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        refused = decode_error(exc)
        raise ConfigError(f"{where}: {_field(refused.field, '')}{refused.reason}") from None
    fields = entry.cron.split()
    reason = _cron_problem(fields)
    if reason is not None:
        raise ConfigError(f"{where}: cron: {reason}")
    try:
        op = decode_operation(bytes(entry.operation))
        if op.user_operation_id is not None:
            raise InvalidOperation("userOperationId", "not allowed: each tick derives its own")
        for field, value in (("runAt", op.run_at), ("delayMs", op.delay_ms)):
            if value is not None:
                raise InvalidOperation(field, "not allowed: each tick runs at its own time")
        storable(op)
    except InvalidOperation as exc:
        raise ConfigError(f"{where}: {_field(exc.field, 'operation')}{exc.reason}") from None
    return Schedule(name=name, cron=" ".join(fields), operation=op)


def _field(field: str, parent: str) -> str:
    """``field`` under ``parent`` as the start of a message; ``body`` is the parent itself."""
    path = parent if field == "body" else ".".join(p for p in (parent, field) if p)
    return f"{path}: " if path else ""


def _check_name(where: str, name: str) -> None:
    if not name:
        raise ConfigError(f"{where}: the name is empty")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: the name is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise ConfigError(f"{where}: the name is longer than {MAX_NAME_BYTES} bytes of UTF-8")
    if _CONTROL.search(name):
        raise ConfigError(f"{where}: the name contains a control character")


def _cron_problem(fields: list[str]) -> str | None:
    """What is wrong with a cron expression split into ``fields``, or None when it is
    usable: five or six fields, values croniter accepts, no hashed or random values, and
    at least one tick (``0 0 30 2 *`` never comes)."""
    if len(fields) not in (5, 6):
        return (
            f"expected 5 fields (minute hour day month weekday) or 6 (second first), "
            f"got {len(fields)}"
        )
    if any(_HASHED.match(part) for field in fields for part in field.split(",")):
        return "hashed (H) and random (R) values are not supported"
    try:
        _cron(fields, EARLIEST_RUN_AT).get_next(dt.datetime)
    except CroniterBadDateError:
        return "matches no date"
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # croniter's errors
        return str(exc) or type(exc).__name__
    return None


def _cron(fields: list[str], start: dt.datetime) -> croniter[dt.datetime]:
    """croniter over ``fields`` from ``start``: a sixth field is the seconds, first."""
    return croniter(
        " ".join(fields), start, ret_type=dt.datetime, second_at_beginning=len(fields) == 6
    )


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment.isoformat()}: give an aware one")
    return moment.astimezone(dt.UTC)


def next_tick(schedule: Schedule, after: dt.datetime) -> dt.datetime:
    """The schedule's first tick strictly after ``after``, in UTC.

    Never fails for a parsed schedule: cron fields repeat within 28 years, and parsing
    found a tick."""
    return _utc(_cron(schedule.cron.split(), _utc(after)).get_next(dt.datetime))


def ticks_between(
    schedule: Schedule, after: dt.datetime, until: dt.datetime, *, limit: int = MAX_TICKS
) -> list[dt.datetime]:
    """The schedule's ticks in (``after``, ``until``], in order, in UTC: at most ``limit``
    of them (MAX_TICKS by default), the earliest. A caller that gets ``limit`` back asks
    again from the last one."""
    until = _utc(until)
    ticks: list[dt.datetime] = []
    cron = _cron(schedule.cron.split(), _utc(after))
    while len(ticks) < limit:
        tick = _utc(cron.get_next(dt.datetime))
        if tick > until:
            break
        ticks.append(tick)
    return ticks


def latest_tick(schedule: Schedule, now: dt.datetime) -> dt.datetime:
    """The schedule's last tick at or before ``now``, in UTC."""
    # Ticks fall on whole seconds, and croniter's previous tick is strictly before its start.
    start = _utc(now).replace(microsecond=0) + dt.timedelta(seconds=1)
    return _utc(_cron(schedule.cron.split(), start).get_prev(dt.datetime))


def due_on_start(
    schedule: Schedule, last_tick: dt.datetime | None, now: dt.datetime
) -> dt.datetime | None:
    """The missed tick to run now, when the scheduler (re)starts, or None.

    The rule: ticks that came while nothing ran are coalesced. When the last tick recorded
    for the schedule (``last_tick``) is older than the schedule's latest tick at or before
    ``now``, that latest tick is due, once, however many ticks were missed before it; the
    earlier ones are never run. A schedule never recorded (``last_tick`` None, e.g. new in
    the configuration) has missed nothing: it starts from ``now``, at its next tick."""
    if last_tick is None:
        return None
    latest = latest_tick(schedule, now)
    return latest if _utc(last_tick) < latest else None


def tick_id(name: str, tick: dt.datetime) -> str:
    """The userOperationId of schedule ``name``'s operation at ``tick``: a uuid5 of the name
    and the tick's UTC ISO time, so every process submits the same id for the same tick."""
    # The name's length first, so no two (name, time) pairs make the same string.
    return derived_id(_NAMESPACE, f"{len(name)}:{name}:{_utc(tick).isoformat()}")


def tick_operation(schedule: Schedule, tick: dt.datetime) -> Operation:
    """The operation submitted for ``tick``: the template, with the tick's id and time
    (a shallow copy: its ``values``, ``key``, ``params`` and ``meta`` are the template's)."""
    return msgspec.structs.replace(
        schedule.operation,
        user_operation_id=uuid.UUID(tick_id(schedule.name, tick)),
        run_at=_utc(tick),
    )
