"""Where a streamsvc run happens: a fresh database with the workload, a fresh Redis prefix
and RabbitMQ names, and `streamsvc run` child processes on them. Also what a run watches
while it goes: finished operations (for the progress bar, and to notice a stall), the
service's memory, the CPU each process uses and the hypervisor takes, and the moment
nothing is left pending.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import baselines, workload
from benchmarks.harness import PG, REDIS_URL, RMQ_URL, ServiceProcess, free_port, start_together
from streamsvc.adapters import streams as rs

PENDING_LEFT = """SELECT EXISTS (SELECT 1 FROM "BatchOperations"
                  WHERE status IN ('UNPROCESSED', 'PROCESSING'))"""
FINISHED = """SELECT count(*) FROM "BatchOperations" WHERE status IN ('SUCCESS', 'FAIL')"""
SUBMITTING_ROLES = ("all", "ingress")  # the processes that take submissions over HTTP


@dataclass
class Stage:
    name: str  # the database
    prefix: str  # Redis keys and RabbitMQ names
    conn: asyncpg.Connection
    redis: Any
    services: list[tuple[str, ServiceProcess]]  # (role, process)
    env: dict[str, str]  # what every service process of the stage runs with

    async def start(self, role: str) -> ServiceProcess:
        """One more `streamsvc run --role <role>` on this stage (stopped with the rest)."""
        service = ServiceProcess(
            {**self.env, "STREAMSVC_HTTP_PORT": str(free_port())},
            Path(tempfile.mkdtemp(prefix="streamsvc-bench-")),
        )
        self.services.append((role, service))
        await service.start("--role", role)
        return service

    @property
    def inbox(self) -> str:
        return rs.Names(self.prefix).inbox

    @property
    def queue(self) -> str:
        return f"{self.prefix}-rpc"

    @property
    def http_url(self) -> str:
        """The HTTP API of the first process taking submissions ("" when none does)."""
        ports = [s.env["STREAMSVC_HTTP_PORT"] for r, s in self.services if r in SUBMITTING_ROLES]
        return f"http://127.0.0.1:{ports[0]}" if ports else ""

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for _, s in self.services if s.proc is not None]

    def ingress(self) -> dict[str, Any]:
        """What `scenarios.connect` needs to reach this stage's service."""
        return {
            "redis": self.redis,
            "inbox": self.inbox,
            "queue": self.queue,
            "http_url": self.http_url,
        }


@asynccontextmanager
async def stage(
    w: workload.Workload,
    flushers: int,
    limit: int,
    roles: list[str],
    *,
    env: Mapping[str, str] | None = None,
    prepare: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> AsyncIterator[Stage]:
    """``w``'s database, and one `streamsvc run --role <role>` per role, running on it
    (more may be started with ``Stage.start``); ``env``: more settings for them;
    ``prepare``: run on the database before they start."""
    prefix = f"streamsvc-bench-{uuid.uuid4().hex[:8]}"
    env = {
        "DB_HOST": str(PG["host"]),
        "DB_PORT": str(PG["port"]),
        "DB_USERNAME": str(PG["user"]),
        "STREAMSVC_REDIS_PREFIX": prefix,
        "STREAMSVC_AUTH": "off",
        "STREAMSVC_ALLOWED_TABLES": workload.ALLOWED,
        "STREAMSVC_FLUSHERS": str(flushers),
        "BATCH_PROCESS_OPERATION_LIMIT": str(limit),
        "BATCH_SERVICE_RMQ_QUEUE": f"{prefix}-rpc",
        "STREAMSVC_EVENTS_EXCHANGE": f"{prefix}-events",
        **(env or {}),
    }
    async with baselines.fresh_database(w, migrate=True) as (name, conn):
        if prepare is not None:
            await prepare(conn)
        redis = rs.connect(REDIS_URL)
        services: list[tuple[str, ServiceProcess]] = []
        st = Stage(name, prefix, conn, redis, services, {**env, "DB_NAME": name})
        try:
            # `all`, or a split such as ingress + flusher
            await start_together([functools.partial(st.start, role) for role in roles])
            yield st
        finally:
            for _, service in services:
                await service.terminate()
            keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()
            await _drop_rabbitmq(prefix)
        for _, service in services:  # kept when something failed: the log says why
            shutil.rmtree(service.workdir, ignore_errors=True)


async def _drop_rabbitmq(prefix: str) -> None:
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{prefix}-rpc")
        await channel.exchange_delete(f"{prefix}-events")


async def finished(st: Stage, *, inbox: bool) -> None:
    """Return once every submitted operation is finished. Cheap to ask: nothing left in the
    inbox (entries are acked only once stored) and no stored operation pending (a partial
    index answers that)."""
    while True:
        empty = not inbox or not await st.redis.xlen(st.inbox)
        if empty and not await st.conn.fetchval(PENDING_LEFT):
            return
        await anyio.sleep(0.01)


async def watch(
    st: Stage, update: Callable[[int], None], *, every_s: float = 0.25, stall_s: float = 30.0
) -> None:
    """Report the count of finished operations until cancelled; raise when it stops moving
    for ``stall_s`` (the service is stuck: its log says why)."""
    conn = await asyncpg.connect(database=st.name, **PG)
    try:
        done, moved = -1, time.monotonic()
        while True:
            now = int(await conn.fetchval(FINISHED))
            if now != done:
                done, moved = now, time.monotonic()
                update(done)
            elif time.monotonic() - moved > stall_s:
                logs = ", ".join(str(s.log_path) for _, s in st.services)
                raise TimeoutError(f"no operation finished for {stall_s:.0f} s; see {logs}")
            await anyio.sleep(every_s)
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


# The servers a run's CPU is also counted for, by the command name of their processes.
SERVERS = {"postgres": "postgres", "redis": "redis-server", "rabbitmq": "beam.smp"}
_TICKS = os.sysconf("SC_CLK_TCK")


def processes(st: Stage) -> dict[str, list[int]]:
    """The processes sharing this machine's CPU in a run, by name: each service role, each
    local server (all of its processes) and this bench process (the load and the
    measuring)."""
    groups: dict[str, list[int]] = {}
    for role, service in st.services:
        if service.proc is not None:
            groups.setdefault(role, []).append(service.proc.pid)
    groups.update({name: [] for name in SERVERS})
    by_command = {command: name for name, command in SERVERS.items()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "comm").read_text().strip()
            except OSError:  # gone meanwhile
                continue
            if command in by_command:
                groups[by_command[command]].append(int(entry.name))
    groups["bench"] = [os.getpid()]
    return groups


def cpu_used(st: Stage) -> dict[str, dict[int, float]]:
    """CPU time (user + system, seconds) used so far by each process of `processes`."""
    used: dict[str, dict[int, float]] = {}
    for name, pids in processes(st).items():
        used[name] = {}
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
            used[name][pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    return used


def cpu_share(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], seconds: float
) -> dict[str, float]:
    """Each group's CPU between two `cpu_used`, in percent of one core over ``seconds``; a
    process started in between counts all of its time (one that ended, none)."""
    share = {}
    for name, now in after.items():
        then = before.get(name, {})
        used = sum(t - then.get(pid, 0.0) for pid, t in now.items())
        share[name] = round(100 * used / seconds, 1)
    return share


def cpu_per_op(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], operations: int
) -> dict[str, float]:
    """Each group's CPU between two `cpu_used`, in microseconds per operation, and
    "service+servers": every group's but the bench's own (the load it offers)."""
    per_op = {}
    for name, now in after.items():
        then = before.get(name, {})
        used = sum(t - then.get(pid, 0.0) for pid, t in now.items())
        per_op[name] = round(1e6 * used / max(1, operations), 1)
    per_op[SERVICE_AND_SERVERS] = round(
        sum(us for name, us in per_op.items() if name != "bench"), 1
    )
    return per_op


SERVICE_AND_SERVERS = "service+servers"

# Operations (outcomes, for the relay) per unit of work of each stage, from the services'
# own histograms: an intake transaction, a batch transaction, a relay of outcomes.
BATCH_METRICS = {
    "intake": "streamsvc_intake_size_operations",
    "flush": "streamsvc_flush_size_operations",
    "relay": "streamsvc_relay_size_outcomes",
}


async def batch_sizes(st: Stage) -> dict[str, float]:
    """The mean of each of BATCH_METRICS over every service process of ``st`` (their
    /metrics); a stage whose processes did none of it is left out."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for _, service in st.services:
            port = service.env["STREAMSVC_HTTP_PORT"]
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    for stage_name, metric in BATCH_METRICS.items():
                        if sample.name == f"{metric}_sum":
                            sums[stage_name] = sums.get(stage_name, 0.0) + sample.value
                        elif sample.name == f"{metric}_count":
                            counts[stage_name] = counts.get(stage_name, 0.0) + sample.value
    return {name: round(sums[name] / counts[name], 1) for name in counts if counts[name]}


def cpu_times() -> list[int]:
    """The machine's CPU time so far, by kind, in ticks (the "cpu" line of /proc/stat:
    user, nice, system, idle, iowait, irq, softirq, steal, ...)."""
    return [int(ticks) for ticks in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def steal_percent(before: list[int], after: list[int]) -> float:
    """Of the time between two `cpu_times`, the share the hypervisor gave to other guests
    (steal): CPU this machine was owed and did not get, which slows every figure alike."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent[:8])  # guest time is counted in user time already
    return round(100 * spent[7] / total, 1) if total else 0.0


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes together, in MB (VmRSS in /proc/<pid>/status)."""
    total_kb = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return round(total_kb / 1024, 1)


async def sample_rss(
    pids: list[int], into: list[list[float]], started: float, *, every_s: float = 0.5
) -> None:
    """Append [seconds since ``started``, MB] to ``into`` every ``every_s`` until cancelled."""
    while True:
        into.append([round(time.perf_counter() - started, 2), rss_mb(pids)])
        await anyio.sleep(every_s)
