"""The rate sweep: what an operation costs, and how long it takes, at each offered rate.

Callers mostly live below full load, where a fixed cost per cycle (a round trip, a commit,
a publish) is shared by few operations. For the inbox and for single-operation RPC (the
old callers' main path), the sweep offers each rate of ``RATES`` below that ingress's
maximum for a few seconds, open loop, each on a fresh stage (benchmarks.latency.measure),
then adds the maximum itself (the closed-loop throughput run of the same bench). Each point
gives the CPU per operation of every process, the service's and the servers' added up
(not the bench's own, which is the load), the mean size of each stage's unit of work
(intake transaction, batch transaction, relay of outcomes) and the latency of every leg.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from benchmarks import latency
from benchmarks.stage import BATCH_METRICS, SERVICE_AND_SERVERS

RATES = (500, 1000, 2500, 5000, 10_000)
INGRESSES = ("inbox", "rpc-single")
BELOW_MAX = 0.9  # a rate this close to the maximum only measures the maximum again
KIND = "sweep"

Result = dict[str, Any]
Progress = Callable[[str, int], Callable[[int], None]]


def rates_below(maximum: float, rates: tuple[int, ...] = RATES) -> list[int]:
    """The rates of ``rates`` an ingress whose maximum is ``maximum`` can be offered."""
    return [r for r in rates if r < BELOW_MAX * maximum]


async def sweep(
    maxima: dict[str, Result],
    *,
    seconds: float,
    flushers: int,
    limit: int,
    roles: list[str],
    progress: Progress,
    rates: tuple[int, ...] = RATES,
) -> list[Result]:
    """One point per ingress of ``maxima`` (its throughput result) and rate below its
    maximum, then one at the maximum."""
    points: list[Result] = []
    for name, top in maxima.items():
        for rate in rates_below(top["ops_per_s"], rates):
            measured = await latency.measure(
                name,
                rate,
                seconds,
                flushers=flushers,
                limit=limit,
                roles=roles,
                progress=progress,
            )
            points.append(point(name, rate, measured))
        points.append(at_maximum(name, top))
    return points


def point(name: str, rate: float, measured: dict[str, Any]) -> Result:
    return {
        "scenario": f"{name} @ {rate:,.0f}/s",
        "kind": KIND,
        "ingress": name,
        "offered": round(rate),
        "cpu_us": measured["cpu_us"],
        "mean_batches": measured["mean_batches"],
        "latency_ms": measured,
    }


def at_maximum(name: str, top: Result) -> Result:
    """The throughput run's figures as the sweep's last point (closed loop: its latency
    is not an offered-load latency, and is left out)."""
    return {
        "scenario": f"{name} @ max",
        "kind": KIND,
        "ingress": name,
        "offered": top["ops_per_s"],
        "maximum": True,
        "cpu_us": top["cpu_us"],
        "mean_batches": top["mean_batches"],
    }


def points_of(results: list[Result]) -> list[Result]:
    return [r for r in results if r.get("kind") == KIND]


def table(points: list[Result]) -> Table:
    """CPU per operation, batch sizes and latency per leg, a row per point."""
    grid = Table(title="rate sweep", header_style="bold")
    grid.add_column("ingress", style="bold")
    grid.add_column("offered/s", justify="right")
    grid.add_column("CPU µs/op (service+servers)", justify="right")
    grid.add_column("by process, µs/op")
    grid.add_column("mean batch: " + " / ".join(BATCH_METRICS), justify="right")
    grid.add_column("p50/p99 ms: submit→event", justify="right")
    for leg in latency.LEGS:
        grid.add_column(f"p50/p99 {latency.LEGS[leg]}", justify="right")
    grid.add_column(f"p50/p99 {latency.REPLY}", justify="right")
    for p in points:
        cpu = dict(p["cpu_us"])
        total = cpu.pop(SERVICE_AND_SERVERS)
        cpu.pop("bench", None)
        by = ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
        lat = p.get("latency_ms")
        legs = [_pair(lat["stages"][leg]) if lat else "—" for leg in latency.LEGS]
        reply = lat["stages"].get(latency.REPLY_KEY) if lat else None
        legs.append(_pair(reply) if reply else "—")
        grid.add_row(
            p["ingress"],
            f"{p['offered']:,}" + (" (max)" if p.get("maximum") else ""),
            f"{total:,.0f}",
            by,
            " / ".join(f"{p['mean_batches'].get(k, 0):,.1f}" for k in BATCH_METRICS),
            _pair(lat) if lat else "—",
            *legs,
        )
    return grid


def _pair(percentiles: dict[str, float]) -> str:
    return f"{percentiles['p50']:,.1f} / {percentiles['p99']:,.1f}"


def chart(points: list[Result], path: Path, *, title: str) -> None:
    """CPU per operation against the offered rate, and p50/p99 submit -> event, a colour
    per ingress (log axes for the rate and the cost)."""
    figure = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(figure)
    cost, wait = figure.subplots(2, 1, sharex=True)
    figure.suptitle(title, fontsize=10)
    for n, name in enumerate(dict.fromkeys(p["ingress"] for p in points)):
        colour = f"C{n}"  # one colour per ingress in both panels
        mine = [p for p in points if p["ingress"] == name]
        cost.plot(
            [p["offered"] for p in mine],
            [p["cpu_us"][SERVICE_AND_SERVERS] for p in mine],
            marker="o",
            color=colour,
            label=name,
        )
        timed = [p for p in mine if p.get("latency_ms")]
        for percentile, style in (("p50", "--"), ("p99", "-")):
            wait.plot(
                [p["offered"] for p in timed],
                [p["latency_ms"][percentile] for p in timed],
                style,
                marker="o",
                color=colour,
                label=f"{name} {percentile}",
            )
    cost.set_xscale("log")
    cost.set_yscale("log")
    cost.set_ylabel("CPU µs per operation\n(service + servers, log scale)")
    cost.set_title("cost per operation (the last point of each line: the maximum)", fontsize=10)
    wait.set_ylabel("ms")
    wait.set_xlabel("offered operations per second (log scale)")
    wait.set_title("submit -> outcome event", fontsize=10)
    for ax in (cost, wait):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)


async def maxima_of(
    results: list[Result], measure: Callable[[str], Awaitable[Result]]
) -> dict[str, Result]:
    """Each ingress's throughput result from ``results`` (this run's), measured with
    ``measure`` when the run did not include it."""
    found = {r["scenario"]: r for r in results if r.get("kind") == "streamsvc"}
    return {name: found.get(name) or await measure(name) for name in INGRESSES}
