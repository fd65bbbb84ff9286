import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import report

RESULTS: list[dict[str, Any]] = [
    {
        "scenario": "inbox",
        "kind": "streamsvc",
        "operations": 50_000,
        "seconds": 2.5,
        "ops_per_s": 20_000,
        "mean_batch": 980.5,
        "latency_ms": {"rate": 5_000, "p50": 40.0, "p95": 85.5, "p99": 130.0},
        "rss_mb": [[0.0, 90.0], [1.0, 96.0], [2.0, 101.0]],
        "steal_pct": 37.0,
        "note": "LIMIT 1000 / INTERVAL 1000 ms",
    },
    {
        "scenario": "naive",
        "kind": "baseline",
        "operations": 50_000,
        "seconds": 62.5,
        "ops_per_s": 800,
    },
    {"scenario": "copy+update", "kind": "ceiling", "operations": 50_000, "ops_per_s": 40_000},
    {"scenario": "old design cap", "kind": "arithmetic", "ops_per_s": 1_000},
]


def test_ratios_are_taken_against_naive_and_the_ceiling() -> None:
    got = {r["scenario"]: (r["x_naive"], r["x_ceiling"]) for r in report.ratios(RESULTS)}
    assert got == {
        "inbox": (25.0, 0.5),
        "naive": (1.0, 0.02),
        "copy+update": (50.0, 1.0),
        "old design cap": (1.25, 0.03),
    }


def test_ratios_are_left_out_without_their_reference_and_inputs_stay_as_they_were() -> None:
    without_naive = [r for r in RESULTS if r["scenario"] != report.NAIVE]
    got = report.ratios(without_naive)
    assert all("x_naive" not in r and "x_ceiling" in r for r in got)
    assert all("x_ceiling" not in r for r in report.ratios(RESULTS[:2]))
    assert all("x_naive" not in r for r in RESULTS)


def test_table_shows_every_scenario_with_its_ratios() -> None:
    console = Console(record=True, width=200)
    console.print(report.table(RESULTS))
    text = console.export_text()
    for scenario in ("inbox", "naive", "copy+update", "old design cap"):
        assert scenario in text
    assert "x naive" in text
    assert "25.00" in text  # inbox against naive
    assert "40.0/85.5/130 @ 5,000/s" in text
    assert "90→101 (+11)" in text
    assert "steal %" in text and " 37 " in text
    assert "LIMIT 1000 / INTERVAL 1000 ms" in text
    assert "—" in text  # figures the arithmetic row does not have


def test_latency_table_shows_each_leg_and_the_cpu_by_process_busiest_first() -> None:
    legs = {"p50": 5.0, "p95": 9.0, "p99": 12.0}
    measured = {
        **RESULTS[0],
        "latency_ms": {
            **RESULTS[0]["latency_ms"],
            "stages": {"stored": legs, "claimed": legs, "event": {**legs, "p99": 140.0}},
            "cpu": {"ingress": 31.5, "postgres": 77.0, "bench": 15.2},
        },
    }
    assert report.latency_table(RESULTS) is None  # no run measured its legs
    legs_table = report.latency_table([measured, *RESULTS[1:]])
    assert legs_table is not None
    console = Console(record=True, width=200)
    console.print(legs_table)
    text = console.export_text()
    assert "submit→stored" in text and "claimed→event" in text
    assert "5.0/9.0/12.0" in text and "5.0/9.0/140" in text
    assert "postgres 77, ingress 32, bench 15" in text
    assert "naive" not in text


LATENCY_ONLY = {
    "scenario": "delayed",
    "kind": "streamsvc",
    "operations": 2000,
    "latency_ms": {"p50": 4.5, "p95": 20.0, "p99": 61.0},
}


def test_a_row_with_only_a_latency_gets_no_ratios_and_shows_it_without_a_rate(
    tmp_path: Path,
) -> None:
    results = [*RESULTS, LATENCY_ONLY]
    assert "x_naive" not in report.ratios(results)[-1]
    console = Console(record=True, width=250)
    console.print(report.table(results))
    row = next(line for line in console.export_text().splitlines() if "delayed" in line)
    assert "4.5/20.0/61.0 " in row and "@" not in row
    report.chart(results, tmp_path / "chart.png", title="t")
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_save_writes_json_that_round_trips_and_a_png(tmp_path: Path) -> None:
    machine = {"cpus": 8, "roles": ["all"]}
    data, picture = report.save(RESULTS, machine, tmp_path / "results", stamp="20240101T000000")
    assert data == tmp_path / "results" / "bench-20240101T000000.json"
    assert picture == tmp_path / "results" / "bench-20240101T000000.png"
    assert json.loads(data.read_text()) == {"machine": machine, "results": report.ratios(RESULTS)}
    png = picture.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 20_000


@pytest.mark.parametrize("keep", [["naive"], ["naive", "inbox"]])
def test_chart_leaves_out_panels_without_data(tmp_path: Path, keep: list[str]) -> None:
    path = tmp_path / "chart.png"
    report.chart([r for r in RESULTS if r["scenario"] in keep], path, title="t")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_progress_task_sets_a_monotone_completed_count() -> None:
    out = io.StringIO()
    with report.Progress(Console(file=out, width=120)) as progress:
        completed = progress.task("inbox", total=10)
        completed(4)
        completed(7)
        completed(7)
        completed(3)  # late or repeated reports do not move the bar back
        progress.note("running naive [all] ...")
    note, bar = out.getvalue().splitlines()  # not a terminal: the final state only
    assert note == "running naive [all] ..."
    assert bar.startswith("inbox ")
    assert " 7/10 " in bar
    assert "ops/s" in bar
