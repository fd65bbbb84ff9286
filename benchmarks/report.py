"""How a bench run is shown: a live progress bar, then a table, a JSON file and a PNG chart.

A result is a JSON-able dict: "scenario", "kind" (streamsvc | baseline | ceiling |
arithmetic), "ops_per_s" (not for rows that measure only a latency), and when measured
"operations", "seconds", "mean_batch",
"latency_ms" ({"rate", "p50", "p95", "p99"}, and "stages" and "cpu" where measured; without
"rate" for latencies that are not at an offered rate: priority probes, delayed lateness),
"rss_mb" ([[seconds, MB], ...]), "steal_pct" (CPU time the hypervisor gave to other guests
during the scenario, in percent: the machine's noise) and "note".
Every throughput is also given as a ratio to the naive baseline and to the ceiling.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import rich.progress
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from benchmarks import sweep
from benchmarks.latency import LEGS, REPLY, REPLY_KEY

NAIVE = "naive"  # the scenario ratios are taken against
CEILING = "copy+update"  # the ceiling ratios are taken against
RATIOS = {"x_naive": NAIVE, "x_ceiling": CEILING}

# One colour per kind, in the table and the chart alike.
KIND_COLOURS = {
    "streamsvc": "#1f77b4",
    "baseline": "#8c8c8c",
    "ceiling": "#2ca02c",
    "arithmetic": "#9467bd",
}
OTHER_COLOUR = "#bcbd22"
PERCENTILES = {"p50": "#9ecae1", "p95": "#4292c6", "p99": "#08519c"}
MISSING = "—"

Result = dict[str, Any]


def ratios(results: list[Result]) -> list[Result]:
    """Each result with "x_naive" and "x_ceiling" added (its ops/s over that scenario's,
    to 2 places), each only when it has a throughput and its reference scenario is
    present; returns new dicts."""
    reference = {r["scenario"]: r["ops_per_s"] for r in results if r.get("ops_per_s")}
    out = []
    for result in results:
        result = dict(result)
        for key, scenario in RATIOS.items():
            if scenario in reference and result.get("ops_per_s"):
                result[key] = round(result["ops_per_s"] / reference[scenario], 2)
        out.append(result)
    return out


def main_rows(results: list[Result]) -> list[Result]:
    """The results but the rate sweep's points, which have a table and a chart of their
    own (benchmarks.sweep)."""
    return [r for r in results if r.get("kind") != sweep.KIND]


def table(results: list[Result]) -> Table:
    """One row per result, ratios beside the throughput; missing figures show as a dash."""
    grid = Table(title="streamsvc bench", header_style="bold")
    grid.add_column("scenario", style="bold")
    grid.add_column("kind")
    for heading in ("ops", "seconds", "ops/s", "x naive", "x ceiling", "mean batch"):
        grid.add_column(heading, justify="right")
    grid.add_column("p50/p95/p99 ms @ offered", justify="right")
    grid.add_column("RSS MB start→end", justify="right")
    grid.add_column("steal %", justify="right")
    grid.add_column("note", style="dim")
    for r in ratios(main_rows(results)):
        kind = r.get("kind", "")
        grid.add_row(
            r["scenario"],
            Text(kind, style=_colour(kind)),
            _number(r.get("operations"), "{:,}"),
            _number(r.get("seconds"), "{:.2f}"),
            _number(r.get("ops_per_s"), "{:,}"),
            _number(r.get("x_naive"), "{:.2f}"),
            _number(r.get("x_ceiling"), "{:.2f}"),
            _number(r.get("mean_batch"), "{:,.1f}"),
            _latency(r.get("latency_ms")),
            _rss(r.get("rss_mb")),
            _number(r.get("steal_pct"), "{:.0f}"),
            r.get("note", ""),
        )
    return grid


def latency_table(results: list[Result]) -> Table | None:
    """Where each latency run's time went: p50/p95/p99 of each leg, and the CPU each
    process took meanwhile (percent of one core); None when no run has them."""
    runs = [r for r in main_rows(results) if "stages" in r.get("latency_ms", {})]
    if not runs:
        return None
    grid = Table(title="where the latency goes", header_style="bold")
    grid.add_column("scenario", style="bold")
    grid.add_column("offered", justify="right")
    for heading in LEGS.values():
        grid.add_column(f"{heading} ms", justify="right")
    grid.add_column(f"{REPLY} ms", justify="right")
    grid.add_column("CPU, % of one core")
    for r in runs:
        latency = r["latency_ms"]
        cpu = sorted(latency.get("cpu", {}).items(), key=lambda item: -item[1])
        grid.add_row(
            r["scenario"],
            f"{latency['rate']:,.0f}/s",
            *(_latency(latency["stages"][leg]) for leg in LEGS),
            _latency(latency["stages"].get(REPLY_KEY)),
            ", ".join(f"{name} {share:.0f}" for name, share in cpu),
        )
    return grid


def _number(value: float | None, form: str) -> str:
    return MISSING if value is None else form.format(value)


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _latency(latency: dict[str, float] | None) -> str:
    if not latency:
        return MISSING
    text = "/".join(_ms(latency[p]) for p in PERCENTILES)
    return f"{text} @ {latency['rate']:,.0f}/s" if "rate" in latency else text


def _rss(samples: list[list[float]] | None) -> str:
    if not samples:
        return MISSING
    start, end = samples[0][1], samples[-1][1]
    return f"{start:,.0f}→{end:,.0f} ({end - start:+,.0f})"


def save(
    results: list[Result], machine: dict[str, Any], directory: Path, *, stamp: str | None = None
) -> tuple[Path, Path]:
    """Write bench-<stamp>.json ({"machine", "results" with ratios}) and bench-<stamp>.png
    into directory, and sweep-<stamp>.png when the run swept rates; returns the first
    two paths."""
    stamp = stamp or time.strftime("%Y%m%dT%H%M%S")
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"bench-{stamp}.json"
    data.write_text(json.dumps({"machine": machine, "results": ratios(results)}, indent=2) + "\n")
    picture = directory / f"bench-{stamp}.png"
    setup = textwrap.fill("  ".join(f"{k}={_plain(v)}" for k, v in machine.items()), 120)
    chart(results, picture, title=f"streamsvc bench {stamp}\n{setup}")
    if points := sweep.points_of(results):
        sweep.chart(points, directory / f"sweep-{stamp}.png", title=f"rate sweep {stamp}")
    return data, picture


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def chart(results: list[Result], path: Path, *, title: str) -> None:
    """A PNG with throughput bars for every result, then latency percentiles and RSS over
    time for the results that measured them (panels without data are left out)."""
    results = ratios(main_rows(results))
    latency = [r for r in results if r.get("latency_ms")]
    rss = [r for r in results if r.get("rss_mb")]
    heights = [1.0 + 0.45 * len(results)] + [3.2] * (bool(latency) + bool(rss))
    figure = Figure(figsize=(11, sum(heights) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)  # renders without a screen; pyplot's state stays untouched
    axes = figure.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    figure.suptitle(title, fontsize=10)
    _throughput(axes[0], results)
    if latency:
        _latency_panel(axes[1], latency)
    if rss:
        _rss_panel(axes[-1], rss)
    figure.savefig(path, dpi=110)


def _throughput(ax: Axes, results: list[Result]) -> None:
    shown = [r for r in results if r.get("ops_per_s", 0) > 0]  # a log axis has no zero
    rates = [r["ops_per_s"] for r in shown]
    kinds = [r.get("kind", "") for r in shown]
    bars = ax.barh(
        [r["scenario"] for r in shown],
        rates,
        color=[_colour(k) for k in kinds],
        hatch=[_hatch(k) for k in kinds],
        edgecolor="white",
    )
    ax.set_xscale("log")
    ax.invert_yaxis()  # first result on top, as in the table
    if rates:  # room on the right for the labels
        ax.set_xlim(10 ** math.floor(math.log10(min(rates))), max(rates) * 12)
    labels = [
        f"{r['ops_per_s']:,}/s" + (f"  {r['x_naive']:.2f}x naive" if "x_naive" in r else "")
        for r in shown
    ]
    ax.bar_label(bars, labels, padding=4, fontsize=8)
    ax.set_xlabel("operations per second (log scale)")
    ax.set_title("throughput", loc="left", fontsize=10)
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.legend(  # above the panel, clear of the bar labels
        handles=[
            Patch(facecolor=_colour(k), hatch=_hatch(k), edgecolor="white", label=k)
            for k in dict.fromkeys(kinds)
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=len(set(kinds)),
        frameon=False,
        fontsize=8,
    )


def _colour(kind: str) -> str:
    return KIND_COLOURS.get(kind, OTHER_COLOUR)


def _hatch(kind: str) -> str:
    return "//" if kind == "arithmetic" else ""  # worked out, not measured


def _latency_panel(ax: Axes, results: list[Result]) -> None:
    width = 0.8 / len(PERCENTILES)
    for i, (p, colour) in enumerate(PERCENTILES.items()):
        xs = [n + (i - 1) * width for n in range(len(results))]
        bars = ax.bar(xs, [r["latency_ms"][p] for r in results], width, color=colour, label=p)
        ax.bar_label(bars, fmt="{:.1f}", padding=2, fontsize=7)
    ax.set_xticks(
        range(len(results)),
        [_latency_label(r) for r in results],
        fontsize=8,
    )
    ax.set_ylabel("ms")
    ax.set_title("latency (at an offered rate, where one is shown)", loc="left", fontsize=10)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _latency_label(r: Result) -> str:
    rate = r["latency_ms"].get("rate")
    return r["scenario"] if rate is None else f"{r['scenario']}\n@ {rate:,.0f} ops/s"


def _rss_panel(ax: Axes, results: list[Result]) -> None:
    for r in results:
        seconds, megabytes = zip(*r["rss_mb"], strict=True)
        ax.plot(seconds, megabytes, label=r["scenario"], linewidth=1.5)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("RSS MB")
    ax.set_title("service memory", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


class _Rate(rich.progress.ProgressColumn):
    """Operations per second of a task, as rich estimates it."""

    def render(self, task: rich.progress.Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} ops/s", style="cyan")


class Progress:
    """A progress bar per running step on stderr (or the given console), kept after the run.

    with Progress() as progress:
        advance = progress.task("inbox", total=50_000)
        advance(done)  # the completed count so far
    """

    def __init__(self, console: Console | None = None) -> None:
        self._progress = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}"),
            rich.progress.BarColumn(),
            rich.progress.MofNCompleteColumn(),
            _Rate(),
            rich.progress.TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )

    def __enter__(self) -> Progress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Add a bar; call what it returns with the completed count (a lower count is
        ignored, so repeating or reordering reports is harmless)."""
        task_id = self._progress.add_task(description, total=total)
        highest = 0

        def completed(count: int) -> None:
            nonlocal highest
            if count > highest:
                highest = count
                self._progress.update(task_id, completed=count)

        return completed

    def note(self, text: str) -> None:
        """Print a line above the bars, as it is (brackets are not rich markup)."""
        self._progress.console.print(text, markup=False, highlight=False)
