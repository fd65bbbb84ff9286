"""Pure: what the console's fragments show, worked out from the store's records, so the
templates only lay it out (and tests read it without a browser)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from streamsvc.model import OperationView, Status
from streamsvc.store import Minute

# The count windows the overview offers: the query value, its label, its span.
WINDOWS: dict[str, tuple[str, dt.timedelta]] = {
    "5m": ("5 minutes", dt.timedelta(minutes=5)),
    "15m": ("15 minutes", dt.timedelta(minutes=15)),
    "1h": ("hour", dt.timedelta(hours=1)),
    "6h": ("6 hours", dt.timedelta(hours=6)),
    "24h": ("24 hours", dt.timedelta(hours=24)),
    "7d": ("7 days", dt.timedelta(days=7)),
}
DEFAULT_WINDOW = "1h"
THROUGHPUT_MINUTES = 30

# What a row's buttons may do to an operation in each status (the API answers 409 to the
# rest, but a button that can only fail is noise).
RETRYABLE = frozenset({Status.FAIL, Status.CANCELLED})
CANCELLABLE = frozenset({Status.UNPROCESSED, Status.PROCESSING})


def actions(view: OperationView) -> list[str]:
    """The buttons an operation's row offers: ``retry``, ``cancel``, or none."""
    if view.status in RETRYABLE:
        return ["retry"]
    if view.status in CANCELLABLE:
        return ["cancel"]
    return []


def body(view: OperationView) -> str:
    """The operation as its caller sent it, as indented JSON."""
    return msgspec.json.format(msgspec.json.encode(view.operation), indent=2).decode()


def window(value: str | None, now: dt.datetime) -> tuple[str, dt.datetime]:
    """The count window asked for (unknown values: the default) and where it starts."""
    name = value if value in WINDOWS else DEFAULT_WINDOW
    return name, now - WINDOWS[name][1]


class Bar(NamedTuple):
    """One minute's bar in the throughput chart, in the SVG's own units."""

    x: float
    y: float
    width: float
    height: float
    label: str  # the minute and its count, for the bar's tooltip


class Chart(NamedTuple):
    width: int
    height: int
    bars: list[Bar]
    peak: int  # operations in the busiest minute: the top of the scale
    total: int
    first: str  # the first and last minutes, under the chart
    last: str


def chart(minutes: Sequence[Minute], *, width: int = 600, height: int = 120) -> Chart:
    """The throughput bar chart: one bar per minute, oldest left; heights relative to the
    busiest minute, and a minute with any operations at least one unit tall."""
    peak = max((m.finished for m in minutes), default=0)
    slot = width / max(len(minutes), 1)
    bars = []
    for i, minute in enumerate(minutes):
        tall = height * minute.finished / peak if peak else 0.0
        if minute.finished:
            tall = max(tall, 1.0)
        stamp = minute.start.astimezone(dt.UTC).strftime("%H:%M")
        bars.append(
            Bar(
                x=round(i * slot + slot * 0.1, 2),
                y=round(height - tall, 2),
                width=round(slot * 0.8, 2),
                height=round(tall, 2),
                label=f"{stamp} UTC: {minute.finished} finished",
            )
        )
    first = minutes[0].start.astimezone(dt.UTC).strftime("%H:%M") if minutes else ""
    last = minutes[-1].start.astimezone(dt.UTC).strftime("%H:%M") if minutes else ""
    total = sum(m.finished for m in minutes)
    return Chart(width, height, bars, peak, total, first, last)


def stamp(moment: dt.datetime | None) -> str:
    """A time as the console shows it: UTC to the second ("" for none)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def ago(moment: dt.datetime | None, now: dt.datetime) -> str:
    """How long before ``now`` (or after it: "in ..."), roughly, for a reader."""
    if moment is None:
        return ""
    seconds = int((now - moment).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            span = f"{seconds // size} {unit}"
            break
    else:
        span = f"{seconds} s"
    return f"in {span}" if future else f"{span} ago"
