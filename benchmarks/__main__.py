"""`just bench`: streamsvc end to end through each ingress, beside its baselines and
ceilings, in one run on the same servers.

Each streamsvc scenario gets a fresh database with the workload's tables and fresh
`streamsvc run` child processes. Throughput runs from the first submission until every
operation is finished (SUCCESS, or FAIL for poison) in BatchOperations, with every effect
then checked in its table; the service's RSS is sampled meanwhile. Latency is measured
afterwards on a fresh stage, open loop at half that ingress's throughput. Baselines and
ceilings come from benchmarks.baselines and benchmarks.rpc_ceiling; the old service's
design cap is arithmetic. A table is printed; JSON and a PNG chart go to benchmarks/results/.

Three scenarios measure what priority, runAt and orderingKey do (benchmarks.scheduling):
priority (probes at priority 9, then at 0, behind a stored backlog at 0: their stored ->
applied latency), delayed (delayMs operations on several processes: how late each is
applied after its runAt; none may be early) and hot-keys (the inbox's throughput when 10%
of the workload are updates under 100 hot orderingKeys, beside the same operations without
keys).

Two run only when asked for: `--only retention` (about two minutes), the inbox's
throughput while retention deletes a million old finished operations, beside the same
without retention (benchmarks.retention); `--only tracing`, the inbox's throughput with
every span exported over OTLP, beside tracing off, alternated (benchmarks.tracing).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from rich.console import Console

from benchmarks import (
    baselines,
    latency,
    report,
    retention,
    rpc_ceiling,
    scenarios,
    scheduling,
    sweep,
    tracing,
    workload,
)
from benchmarks.stage import (
    batch_sizes,
    cpu_per_op,
    cpu_times,
    cpu_used,
    finished,
    rss_mb,
    sample_rss,
    stage,
    steal_percent,
    watch,
)
from streamsvc import settings

RESULTS = Path(__file__).parent / "results"
BASELINES: dict[str, Callable[[workload.Workload], Awaitable[dict[str, Any]]]] = {
    "naive": baselines.naive,
    "pgqueuer": baselines.peer,
    "copy": baselines.copy_ceiling,
    "copy+update": baselines.copy_update_ceiling,
}
PER_OPERATION = ("naive", "pgqueuer")  # a few hundred to a few thousand ops/s: --n-baseline
OLD_CAP, BROKER = "old-cap", "broker"  # --only names of "old design cap", "broker ceiling"
PRIORITY, DELAYED, HOT_KEYS = FEATURES = ("priority", "delayed", "hot-keys")
RETENTION, TRACING, SWEEP = "retention", "tracing", "sweep"
SCENARIOS = (
    *scenarios.INGRESSES,
    *FEATURES,
    *BASELINES,
    OLD_CAP,
    BROKER,
    SWEEP,
    RETENTION,
    TRACING,
)
# Left out of a run without --only: a million rows to seed each time; six inbox runs.
OPT_IN = (RETENTION, TRACING)
TRACING_ROUNDS = 3  # tracing: off and on, alternated, this many times each
IN_FLIGHT = 64  # rpc-single's requests outstanding, and the broker ceiling's
SPLIT_ROLES = ("ingress", "flusher", "notifier", "sweeper")
DELAY_MS = (1000, 4000)  # the delayed scenario's delayMs, drawn between these
HOT_SHARE = 0.1  # of the hot-keys workload, the share under orderingKeys

Result = dict[str, Any]


@dataclass(frozen=True)
class Options:
    names: list[str]
    n: int  # operations per scenario
    n_single: int  # operations for rpc-single, which is far slower
    n_baseline: int  # operations for naive and pgqueuer, one transaction each
    n_ceiling: int  # requests for the broker ceiling
    latency_s: float  # offered load per latency run; 0 skips latency
    rate: float | None  # offered rate of the latency runs; None: half of the throughput
    flushers: int
    limit: int
    roles: list[str]
    n_backlog: int = 30_000  # priority: operations at priority 0 ahead of the probes
    n_probes: int = 100  # priority: probes at each priority
    n_delayed: int = 2000  # delayed: operations
    processes: int = 3  # delayed: `streamsvc run` processes, every role each
    hot_keys: int = 100  # hot-keys: orderingKeys
    n_old: int = 1_000_000  # retention: old finished operations to delete
    n_retention: int = 200_000  # retention: operations of the workload beside them
    sweep_rates: tuple[int, ...] = sweep.RATES  # sweep: offered rates below the maximum

    def count(self, name: str) -> int:
        if name.startswith("rpc-single"):
            return self.n_single
        return self.n_baseline if name in PER_OPERATION else self.n


Check = Callable[[asyncpg.Connection], Awaitable[None]]


async def throughput(
    name: str,
    n: int,
    opts: Options,
    progress: report.Progress,
    *,
    w: workload.Workload | None = None,
    label: str | None = None,
    check: Check | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Ingress ``name`` closed loop with ``n`` operations (``w``, by default the mixed
    workload), from first submission until none is pending; every effect and status
    checked afterwards (and ``check`` run). ``label``: the scenario's name in the
    result; ``env``: more settings for the service."""
    w = w or workload.build(n)
    label = label or name
    rss: list[list[float]] = []
    async with stage(w, opts.flushers, opts.limit, opts.roles, env=env) as st:
        update = progress.task(f"{label}: {n:,} operations", n)
        async with scenarios.connect(name, **st.ingress()) as ingress:
            via = ingress.via
            cpu_before, started = cpu_used(st), time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, st, update)
                tg.start_soon(sample_rss, st.pids, rss, started)
                await scenarios.drive(ingress, w.ops)
                submitted = time.perf_counter() - started
                await finished(st, inbox=name == "inbox")
                elapsed = time.perf_counter() - started
                tg.cancel_scope.cancel()
            cpu_us = cpu_per_op(cpu_before, cpu_used(st), n)
            rss.append([round(elapsed, 2), rss_mb(st.pids)])
            stage_batches = await batch_sizes(st)
        update(n)
        await workload.verify(st.conn, w)
        await workload.verify_statuses(st.conn, w)
        if check is not None:
            await check(st.conn)
        batches = await st.conn.fetchval(
            "SELECT count(DISTINCT batch_id) FROM \"BatchOperations\" WHERE status = 'SUCCESS'"
        )
    return {
        "scenario": label,
        "kind": "streamsvc",
        "operations": n,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(n / elapsed),
        "submit_seconds": round(submitted, 3),
        "batches": batches,
        "mean_batch": round(n / max(1, batches), 1),
        "rss_mb": rss,
        "cpu_us": cpu_us,
        "mean_batches": stage_batches,
        **({"note": f"via {via}"} if via else {}),
    }


async def ingress(name: str, opts: Options, progress: report.Progress) -> Result:
    """Throughput, then latency at half of it (or at the rate asked for)."""
    result = await throughput(name, opts.count(name), opts, progress)
    if opts.latency_s > 0:
        result["latency_ms"] = await latency.measure(
            name,
            opts.rate or result["ops_per_s"] / 2,
            opts.latency_s,
            flushers=opts.flushers,
            limit=opts.limit,
            roles=opts.roles,
            progress=progress.task,
        )
    return result


async def priority(opts: Options, progress: report.Progress) -> list[Result]:
    """Probes at priority 9, then the same at priority 0, each behind its own stored
    backlog at 0 (benchmarks.scheduling.probe_run): stored -> applied latency."""
    runs = [
        await scheduling.probe_run(
            band,
            backlog=opts.n_backlog,
            probes_n=opts.n_probes,
            flushers=opts.flushers,
            limit=opts.limit,
            progress=progress.task,
        )
        for band in (9, 0)
    ]
    low = runs[1].figures.latency_ms
    results = []
    for run in runs:
        f = run.figures
        ratio = {p: round(f.latency_ms[p] / low[p], 3) for p in ("p50", "p99")}
        note = f"{run.left:,} of {f.backlog:,} at 0 left; drained at {run.drain_ops_per_s:,.0f}/s"
        if run.band != 0:
            note += f"; p50 x{ratio['p50']}, p99 x{ratio['p99']} of priority 0's"
        results.append(
            {
                "scenario": f"priority {run.band} probes",
                "kind": "streamsvc",
                "operations": len(f.behind),
                "latency_ms": f.latency_ms,
                "x_priority_0": ratio,
                "backlog": f.backlog,
                "backlog_left": run.left,
                "drain_ops_per_s": round(run.drain_ops_per_s),
                "ahead_of_median": sum(b > f.backlog / 2 for b in f.behind),
                "note": note,
            }
        )
    return results


async def delayed(opts: Options, progress: report.Progress) -> Result:
    run = await scheduling.delayed_run(
        opts.n_delayed,
        low_ms=DELAY_MS[0],
        high_ms=DELAY_MS[1],
        processes=opts.processes,
        flushers=opts.flushers,
        limit=opts.limit,
        progress=progress.task,
    )
    late = run.lateness
    return {
        "scenario": "delayed",
        "kind": "streamsvc",
        "operations": run.operations,
        "latency_ms": late.percentiles,
        "lateness_max_ms": round(max(late.ms), 1),
        "early": late.early,
        "processes": run.processes,
        "note": f"lateness (applied - runAt), delayMs {DELAY_MS[0]:,}-{DELAY_MS[1]:,}, "
        f"{run.processes} processes; none early; max {max(late.ms):,.0f} ms",
    }


async def hot_keys(opts: Options, progress: report.Progress) -> list[Result]:
    """The mixed workload through the inbox with HOT_SHARE of it updates of hot rows:
    without keys, then under one orderingKey per row (each row's updates then checked in
    order, and each row on its last value)."""
    results = []
    for ordered in (False, True):
        w = workload.with_hot_keys(opts.n, keys=opts.hot_keys, share=HOT_SHARE, ordered=ordered)

        async def in_order(conn: asyncpg.Connection, w: workload.Workload = w) -> None:
            problems = await scheduling.key_order_problems(conn, w.hot, operation_type="HOT_SET")
            assert not problems, "\n".join(problems)

        label = HOT_KEYS if ordered else f"{HOT_KEYS}, no keys"
        check = in_order if ordered else None
        results.append(
            await throughput("inbox", opts.n, opts, progress, w=w, label=label, check=check)
        )
    keyed, plain = results[1], results[0]
    per_key = round(opts.n * HOT_SHARE / opts.hot_keys)
    share = f"{HOT_SHARE:.0%} under {opts.hot_keys} orderingKeys ({per_key} each)"
    plain["note"] = "the same operations without orderingKey"
    keyed["note"] = f"{share}: x{keyed['ops_per_s'] / plain['ops_per_s']:.2f} of no keys"
    return results


async def retention_load(opts: Options, progress: report.Progress) -> list[Result]:
    """The inbox's throughput beside ``n_old`` old finished operations: with retention
    deleting them, then without (benchmarks.retention)."""
    runs = [
        await retention.run(
            opts.n_retention,
            old=opts.n_old,
            retention=on,
            flushers=opts.flushers,
            limit=opts.limit,
            roles=opts.roles,
            progress=progress.task,
        )
        for on in (True, False)
    ]
    on, off = (round(r.operations / r.seconds) for r in runs)
    results = []
    for r, ops_per_s in zip(runs, (on, off), strict=True):
        result: Result = {
            "scenario": f"{RETENTION} {'on' if r.retention else 'off'}",
            "kind": "streamsvc",
            "operations": r.operations,
            "seconds": round(r.seconds, 3),
            "ops_per_s": ops_per_s,
            "old": r.old,
        }
        if r.retention:
            during = r.deleted_during / r.seconds
            result |= {
                "deleted_per_s": round(during),
                "deleted_after_per_s": round(r.left_at_end / (r.after_s or 1)),
                "note": f"x{on / off:.2f} of off; deleted {r.deleted_during:,} old rows "
                f"meanwhile ({during:,.0f}/s), the last {r.left_at_end:,} after it "
                f"alone at {r.left_at_end / (r.after_s or 1):,.0f}/s",
            }
        else:
            result["note"] = f"the same beside {r.old:,} old rows, retention off (0 days)"
        results.append(result)
    return results


async def tracing_cost(opts: Options, progress: report.Progress) -> list[Result]:
    """The inbox's throughput with tracing off and on (every span exported to an OTLP
    receiver, benchmarks.tracing), alternated TRACING_ROUNDS times; each side's median."""
    runs: dict[bool, list[Result]] = {False: [], True: []}
    spans: list[int] = []
    with tracing.sink() as (receiver, env):
        for round_ in range(TRACING_ROUNDS):
            for on in (False, True):
                label = f"{TRACING} {'on' if on else 'off'} #{round_ + 1}"
                before = receiver.spans
                runs[on].append(
                    await throughput(
                        "inbox", opts.n, opts, progress, label=label, env=env if on else None
                    )
                )
                if on:
                    spans.append(receiver.spans - before)
    off, on = (
        sorted(r["ops_per_s"] for r in runs[side])[TRACING_ROUNDS // 2] for side in (False, True)
    )
    results = []
    for side, median in ((False, off), (True, on)):
        each = ", ".join(f"{r['ops_per_s']:,}" for r in runs[side])
        result: Result = {
            "scenario": f"{TRACING} {'on' if side else 'off'}",
            "kind": "streamsvc",
            "operations": opts.n,
            "ops_per_s": median,
            "runs": [r["ops_per_s"] for r in runs[side]],
            "note": f"median of {each}",
        }
        if side:
            result["spans"] = spans
            result["note"] += f"; x{on / off:.2f} of off; spans received per run: " + ", ".join(
                f"{s:,}" for s in spans
            )
        results.append(result)
    return results


async def baseline(name: str, n: int, progress: report.Progress) -> Result:
    update = progress.task(f"{name}: {n:,} operations", n)
    result = await BASELINES[name](workload.build(n))
    update(n)
    return result


def old_design_cap() -> Result:
    """The old NestJS service took at most LIMIT operations every INTERVAL: its defaults,
    which are the settings' defaults."""
    old = settings.load({}, env_file=None)
    per_s = old.batch_limit * 1000 / old.interval_ms
    return {
        "scenario": "old design cap",
        "kind": "arithmetic",
        "ops_per_s": int(per_s) if per_s.is_integer() else round(per_s, 1),
        "note": f"LIMIT {old.batch_limit} / INTERVAL {old.interval_ms} ms",
    }


async def broker_ceiling(requests: int, progress: report.Progress) -> Result:
    update = progress.task(f"broker ceiling: {requests:,} requests", requests)
    per_s, via = await rpc_ceiling.ceiling(requests, IN_FLIGHT)
    update(requests)
    return {
        "scenario": "broker ceiling",
        "kind": "ceiling",
        "operations": requests,
        "seconds": round(requests / per_s, 3),
        "ops_per_s": round(per_s),
        "note": f"request/reply, no work, {IN_FLIGHT} in flight, {via}",
        "via": via,
    }


async def rate_sweep(
    opts: Options, progress: report.Progress, earlier: list[Result]
) -> list[Result]:
    """benchmarks.sweep at this run's maxima (measured now for an ingress the run left out),
    each rate for ``latency_s`` seconds (4 when latency is off)."""

    async def measure(name: str) -> Result:
        return await throughput(name, opts.count(name), opts, progress)

    return await sweep.sweep(
        await sweep.maxima_of(earlier, measure),
        seconds=opts.latency_s or 4.0,
        flushers=opts.flushers,
        limit=opts.limit,
        roles=opts.roles,
        progress=progress.task,
        rates=opts.sweep_rates,
    )


async def run_scenario(
    name: str, opts: Options, progress: report.Progress, earlier: list[Result]
) -> list[Result]:
    """Scenario ``name``'s results (``earlier``: the run's results so far)."""
    if name in scenarios.INGRESSES:
        return [await ingress(name, opts, progress)]
    if name == PRIORITY:
        return await priority(opts, progress)
    if name == DELAYED:
        return [await delayed(opts, progress)]
    if name == HOT_KEYS:
        return await hot_keys(opts, progress)
    if name in BASELINES:
        return [await baseline(name, opts.count(name), progress)]
    if name == OLD_CAP:
        return [old_design_cap()]
    if name == BROKER:
        return [await broker_ceiling(opts.n_ceiling, progress)]
    if name == RETENTION:
        return await retention_load(opts, progress)
    if name == TRACING:
        return await tracing_cost(opts, progress)
    if name == SWEEP:
        return await rate_sweep(opts, progress, earlier)
    raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")


async def bench(opts: Options, progress: report.Progress) -> list[Result]:
    """Every scenario of ``opts``, one after another, in SCENARIOS order."""
    results: list[Result] = []
    for name in [s for s in SCENARIOS if s in opts.names]:
        before = cpu_times()
        found = await run_scenario(name, opts, progress, results)
        steal = steal_percent(before, cpu_times())
        for result in found:
            result["steal_pct"] = steal
            progress.note(summary(result))
        results.extend(found)
    return results


def summary(r: Result) -> str:
    parts = [f"{r['ops_per_s']:,} ops/s"] if "ops_per_s" in r else []
    if lat := r.get("latency_ms"):
        at = f"at {lat['rate']:,} ops/s " if "rate" in lat else ""
        parts.append(f"{at}p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} ms")
    if note := r.get("note"):
        parts.append(note)
    return f"{r['scenario']}: " + "; ".join(parts)


def machine(opts: Options) -> dict[str, Any]:
    """The setup a result file was measured on."""
    setup = asdict(opts)
    del setup["names"]
    return {"cpus": os.cpu_count(), "python": platform.python_version(), **setup}


def parse(argv: list[str] | None = None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--n", type=int, default=30_000, help="operations per scenario")
    parser.add_argument("--n-single", type=int, default=3000, help="operations for rpc-single")
    parser.add_argument(
        "--n-baseline", type=int, default=5000, help="operations for naive and pgqueuer"
    )
    parser.add_argument("--n-ceiling", type=int, default=6400, help="broker ceiling requests")
    parser.add_argument(
        "--latency-s", type=float, default=4.0, help="seconds of offered load per latency run"
    )
    parser.add_argument(
        "--rate", type=float, help="ops/s the latency runs offer (default: half the throughput)"
    )
    parser.add_argument(
        "--n-backlog", type=int, default=30_000, help="priority: operations ahead of the probes"
    )
    parser.add_argument("--n-probes", type=int, default=100, help="priority: probes per run")
    parser.add_argument("--n-delayed", type=int, default=2000, help="delayed: operations")
    parser.add_argument(
        "--processes", type=int, default=3, help="delayed: service processes, every role each"
    )
    parser.add_argument("--hot-keys", type=int, default=100, help="hot-keys: orderingKeys")
    parser.add_argument(
        "--n-old", type=int, default=1_000_000, help="retention: old operations to delete"
    )
    parser.add_argument(
        "--n-retention", type=int, default=200_000, help="retention: operations beside them"
    )
    parser.add_argument(
        "--sweep-rates",
        default=",".join(map(str, sweep.RATES)),
        help="sweep: offered rates (ops/s), each run when below the ingress's maximum",
    )
    parser.add_argument("--flushers", type=int, default=2, help="STREAMSVC_FLUSHERS")
    parser.add_argument("--limit", type=int, default=1000, help="BATCH_PROCESS_OPERATION_LIMIT")
    parser.add_argument(
        "--only",
        choices=SCENARIOS,
        action="append",
        help=f"run just these ({', '.join(OPT_IN)} runs only when named here)",
    )
    parser.add_argument(
        "--roles",
        default=",".join(SPLIT_ROLES),
        help="service processes, one per role given (default: one per role, the deployment "
        "for a host with more than one core); `all` runs every role in one process",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where JSON and PNG go")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    opts = Options(
        names=args.only or [s for s in SCENARIOS if s not in OPT_IN],
        n=args.n,
        n_single=args.n_single,
        n_baseline=args.n_baseline,
        n_ceiling=args.n_ceiling,
        latency_s=args.latency_s,
        rate=args.rate,
        flushers=args.flushers,
        limit=args.limit,
        roles=args.roles.split(","),
        n_backlog=args.n_backlog,
        n_probes=args.n_probes,
        n_delayed=args.n_delayed,
        processes=args.processes,
        hot_keys=args.hot_keys,
        n_old=args.n_old,
        n_retention=args.n_retention,
        sweep_rates=tuple(int(r) for r in args.sweep_rates.split(",")),
    )
    return opts, None if args.no_save else args.out


def main() -> None:
    opts, out = parse()
    started = time.perf_counter()
    with report.Progress() as progress:
        results = anyio.run(bench, opts, progress, backend_options={"use_uvloop": True})
    console = Console(width=None if sys.stdout.isatty() else 200)  # a file gets whole rows
    console.print(report.table(results))
    if (legs := report.latency_table(results)) is not None:
        console.print(legs)
    if points := sweep.points_of(results):
        console.print(sweep.table(points))
    console.print(f"took {time.perf_counter() - started:.0f} s")
    if out is not None:
        for path in report.save(results, machine(opts), out):
            console.print(f"saved {path}")


if __name__ == "__main__":
    main()
