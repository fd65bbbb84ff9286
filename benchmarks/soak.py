"""`just soak`: a steady mixed load for minutes, and whether the service's memory and its
connections stay flat.

One `streamsvc run` per role (ingress, flusher, sweeper, notifier, scheduler) takes the
mixed workload through the inbox at a fixed rate. Every ``every_s`` each process's RSS and
open file descriptors (its sockets to PostgreSQL, Redis and RabbitMQ among them) and
PostgreSQL's connections to the stage's database are sampled (Redis's client count is not:
the server is shared). Flat means: after a warm-up third of the run, the last
third's mean RSS of each process is within 10% (and 8 MiB) of the middle third's, and no
count of connections or descriptors grows by more than a handful.

    python -m benchmarks.soak --minutes 10 --rate 1000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from benchmarks import stage as staging
from benchmarks import workload
from benchmarks.harness import producer

ROLES = ["ingress", "flusher", "sweeper", "notifier", "scheduler"]
RSS_GROWTH = 0.10  # the last third's mean RSS over the middle third's, at most
RSS_SLACK_KB = 8 * 1024
COUNT_SLACK = 4  # connections or descriptors more in the last third than in the middle


@dataclass
class Sample:
    at_s: float
    finished: int
    rss_kb: dict[str, int]  # by role
    fds: dict[str, int]  # by role
    pg_connections: int


@dataclass
class Soak:
    rate: float
    samples: list[Sample] = field(default_factory=list)

    def thirds(self) -> tuple[list[Sample], list[Sample]]:
        third = max(1, len(self.samples) // 3)
        return self.samples[third : 2 * third], self.samples[2 * third :]

    def problems(self) -> list[str]:
        """What grew: empty when memory and connections stayed flat."""
        middle, last = self.thirds()
        if not middle or not last:
            return ["too few samples"]
        found: list[str] = []
        for role in middle[0].rss_kb:
            before = statistics.mean(s.rss_kb[role] for s in middle)
            after = statistics.mean(s.rss_kb[role] for s in last)
            if after > before * (1 + RSS_GROWTH) and after - before > RSS_SLACK_KB:
                found.append(f"{role}: RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
            grew = max(s.fds[role] for s in last) - max(s.fds[role] for s in middle)
            if grew > COUNT_SLACK:
                found.append(f"{role}: {grew} more open descriptors")
        grew = max(s.pg_connections for s in last) - max(s.pg_connections for s in middle)
        if grew > COUNT_SLACK:
            found.append(f"PostgreSQL: {grew} more connections")
        return found

    def table(self) -> str:
        roles = list(self.samples[0].rss_kb) if self.samples else []
        head = ["s", "finished", *(f"{r} MiB" for r in roles), *(f"{r} fds" for r in roles)]
        head += ["pg conns"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.samples:
            cells = [f"{s.at_s:.0f}", str(s.finished)]
            cells += [f"{s.rss_kb[r] / 1024:.0f}" for r in roles]
            cells += [str(s.fds[r]) for r in roles]
            cells += [str(s.pg_connections)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(seconds: float, *, rate: float, every_s: float = 10.0) -> Soak:
    """Run the load for ``seconds`` at ``rate`` operations a second; the samples."""
    w = workload.build(round(seconds * rate) + 1000, seed=11)
    result = Soak(rate)
    async with staging.stage(w, 2, 1000, ROLES) as st:
        started = time.monotonic()

        async def load() -> None:
            async with producer(st.redis, st.inbox) as send:
                sent, tick = 0, max(1, round(rate / 20))  # 20 sends a second
                while time.monotonic() - started < seconds:
                    due = round((time.monotonic() - started) * rate)
                    if due > sent:
                        await send(w.ops[sent : min(due, sent + tick * 4)], pipeline=tick)
                        sent = min(due, sent + tick * 4)
                    await anyio.sleep(0.05)

        async def sample() -> None:
            while time.monotonic() - started < seconds:
                await anyio.sleep(every_s)
                procs = {role: s.proc.pid for role, s in st.services if s.proc is not None}
                result.samples.append(
                    Sample(
                        at_s=time.monotonic() - started,
                        finished=await st.conn.fetchval(staging.FINISHED),
                        rss_kb={role: _rss_kb(pid) for role, pid in procs.items()},
                        fds={role: _fds(pid) for role, pid in procs.items()},
                        pg_connections=await st.conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", st.name
                        ),
                    )
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            await load()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1000, help="operations a second")
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    args = parser.parse_args()
    result = anyio.run(lambda: soak(args.minutes * 60, rate=args.rate, every_s=args.every))
    print(result.table())
    problems = result.problems()
    print("flat" if not problems else "NOT FLAT: " + "; ".join(problems))
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
