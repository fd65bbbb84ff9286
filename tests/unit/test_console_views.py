"""The console's pure decisions: which buttons a row offers, the count window, the chart."""

from __future__ import annotations

import datetime as dt

import pytest

from streamsvc.api.console import views
from streamsvc.model import Operation, OperationView, Status
from streamsvc.store import Minute

NOW = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC)


def view(status: Status) -> OperationView:
    return OperationView(
        id="00000000-0000-0000-0000-000000000001",
        operation_type="T",
        status=status,
        error=None,
        attempts=1,
        priority=0,
        source="http",
        batch_id=None,
        run_at=None,
        ordering_key=None,
        created_at=NOW,
        updated_at=NOW,
        processed_at=None,
        operation=Operation(operation_type="T", sql="DELETE FROM t"),
    )


@pytest.mark.parametrize(
    ("status", "buttons"),
    [
        (Status.UNPROCESSED, ["cancel"]),
        (Status.PROCESSING, ["cancel"]),
        (Status.SUCCESS, []),  # applied once, never again
        (Status.FAIL, ["retry"]),
        (Status.CANCELLED, ["retry"]),
    ],
)
def test_a_row_offers_what_its_status_allows(status: Status, buttons: list[str]) -> None:
    assert views.actions(view(status)) == buttons


@pytest.mark.parametrize(
    ("asked", "name", "span"),
    [
        ("5m", "5m", dt.timedelta(minutes=5)),
        ("7d", "7d", dt.timedelta(days=7)),
        (None, "1h", dt.timedelta(hours=1)),
        ("1y", "1h", dt.timedelta(hours=1)),  # unknown: the default, not an error
    ],
)
def test_count_window(asked: str | None, name: str, span: dt.timedelta) -> None:
    assert views.window(asked, NOW) == (name, NOW - span)


def test_chart_scales_to_the_busiest_minute_and_keeps_small_ones_visible() -> None:
    minutes = [Minute(NOW + dt.timedelta(minutes=i), n) for i, n in enumerate([0, 1, 1000, 500])]
    chart = views.chart(minutes, width=400, height=100)
    assert (chart.peak, chart.total, chart.first, chart.last) == (1000, 1501, "12:00", "12:03")
    assert [bar.height for bar in chart.bars] == [0.0, 1.0, 100.0, 50.0]
    assert [bar.y for bar in chart.bars] == [100.0, 99.0, 0.0, 50.0]
    assert [bar.x for bar in chart.bars] == [10.0, 110.0, 210.0, 310.0]
    assert chart.bars[2].label == "12:02 UTC: 1000 finished"


def test_chart_of_nothing_draws_nothing() -> None:
    assert views.chart([]).bars == []
    idle = views.chart([Minute(NOW, 0)])
    assert (idle.peak, [bar.height for bar in idle.bars]) == (0, [0.0])


@pytest.mark.parametrize(
    ("moment", "said"),
    [
        (NOW - dt.timedelta(seconds=5), "5 s ago"),
        (NOW - dt.timedelta(minutes=90), "1 h ago"),
        (NOW + dt.timedelta(minutes=3, seconds=10), "in 3 min"),
        (NOW + dt.timedelta(days=2), "in 2 d"),
        (None, ""),
    ],
)
def test_ago(moment: dt.datetime | None, said: str) -> None:
    assert views.ago(moment, NOW) == said
