"""Where a service process spends its CPU at a given offered rate: py-spy on every role.

`python -m benchmarks.profile --ingress inbox --rate 1000` starts a fresh stage (one
process per role), offers the rate open loop (benchmarks.latency.offer), and after a
warm-up samples each service process with py-spy for ``--seconds``. It prints each
process's CPU per operation, and its hottest functions by own time and by time spent
beneath them (the share of samples that hold the frame), and keeps each process's
collapsed stacks (``profile-<role>-<time>.txt``, the input of flamegraph.pl or speedscope)
beside the bench's other results.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

from benchmarks import latency, scenarios, workload
from benchmarks.stage import SERVICE_AND_SERVERS, cpu_per_op, cpu_used, stage

RESULTS = Path(__file__).resolve().parent / "results"
SPLIT_ROLES = ("ingress", "flusher", "notifier")
IDLE = ("epoll_wait", "select", "poll", "_run_once")  # the event loop waiting, not working


def collapsed(lines: Iterable[str]) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Own and inclusive sample counts by frame from py-spy's raw (collapsed) output:
    ``frame;frame;...;leaf count`` per line."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        for frame in set(frames):
            under[frame] += int(count)
    return own, under


def top(counter: collections.Counter[str], total: int, n: int) -> list[tuple[str, float]]:
    return [(frame, 100 * count / total) for frame, count in counter.most_common(n)]


async def record(pid: int, seconds: float, out: Path, rate_hz: int, native: bool) -> None:
    """py-spy's collapsed stacks of ``pid`` for ``seconds``, into ``out`` (idle samples
    left out: the share is of the time the process was on a CPU); with ``native``, the C
    and Cython frames too (uvloop's, asyncpg's, hiredis')."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(round(seconds)),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--output",
        str(out),
        # py-spy reads native stacks only from a paused process
        *(["--native"] if native else ["--nonblocking"]),
    ]
    await anyio.run_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def profile(
    ingress: str, rate: float, seconds: float, warm_s: float, rate_hz: int, native: bool
) -> None:
    total_s = warm_s + seconds + 2
    w = workload.build(max(2, round(rate * total_s)))
    ops = [{**op, "userOperationId": str(uuid.uuid4())} for op in w.ops]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    outs: dict[str, Path] = {}
    async with (
        stage(w, 2, 1000, list(SPLIT_ROLES)) as st,
        scenarios.connect(ingress, **st.ingress()) as door,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(latency.offer, door, ops, rate)
        await anyio.sleep(warm_s)
        before, started = cpu_used(st), time.perf_counter()
        async with anyio.create_task_group() as spies:
            for role, service in st.services:
                assert service.proc is not None
                outs[role] = RESULTS / f"profile-{role}-{stamp}.txt"
                spies.start_soon(record, service.proc.pid, seconds, outs[role], rate_hz, native)
        after, elapsed = cpu_used(st), time.perf_counter() - started
    console = Console()
    per_op = cpu_per_op(before, after, round(rate * elapsed))
    console.print(
        f"{ingress} at {rate:,.0f}/s offered, {elapsed:.1f} s sampled at {rate_hz} Hz: "
        f"CPU µs per operation "
        + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(per_op.items(), key=lambda kv: -kv[1]))
        + f" (service and servers: {per_op[SERVICE_AND_SERVERS]:,.0f})"
    )
    for role, path in outs.items():
        own, under = collapsed(path.read_text().splitlines())
        busy = sum(c for f, c in own.items() if not f.startswith(IDLE))
        grid = Table(title=f"{role}: {busy} busy samples ({path.name})", header_style="bold")
        grid.add_column("own %", justify="right")
        grid.add_column("function (own time)")
        grid.add_column("under %", justify="right")
        grid.add_column("function (with what it calls)")
        busy_own = collections.Counter({f: c for f, c in own.items() if not f.startswith(IDLE)})
        rows = zip(top(busy_own, busy, 25), top(under, busy, 25), strict=False)
        for (f1, p1), (f2, p2) in rows:
            grid.add_row(f"{p1:.1f}", f1[:90], f"{p2:.1f}", f2[:90])
        console.print(grid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--ingress", default="inbox", choices=["inbox", "rpc-single", "http-bulk"])
    parser.add_argument("--rate", type=float, default=1000, help="operations per second offered")
    parser.add_argument("--seconds", type=float, default=8, help="how long py-spy samples")
    parser.add_argument("--warm", type=float, default=3, help="seconds of load before it")
    parser.add_argument("--hz", type=int, default=200, help="py-spy's samples per second")
    parser.add_argument(
        "--native", action="store_true", help="C and Cython frames too (py-spy --native)"
    )
    args = parser.parse_args(argv)
    anyio.run(profile, args.ingress, args.rate, args.seconds, args.warm, args.hz, args.native)


if __name__ == "__main__":
    main()
