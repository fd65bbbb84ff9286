"""The fault suite: `streamsvc run` processes driven only through their public doors (the
inbox, HTTP) while processes are killed, connections cut and servers restarted; each
scenario ends with tests.checker's one comparison of what was submitted with what was
applied, failed, lost, duplicated and announced.

`just test` runs each scenario small; `just faults` runs them full size
(STREAMSVC_FAULTS=full) and prints the table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from benchmarks import workload as mixed
from benchmarks.harness import PG, RMQ_URL, ServiceProcess, producer, start_together
from streamsvc.adapters import streams as rs
from tests import checker, cluster, servers
from tests.conftest import settings_env
from tests.pipeline import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

FULL = os.environ.get("STREAMSVC_FAULTS") == "full"
N = 50_000 if FULL else 3_000  # operations per scenario
KILLS = 30 if FULL else 4
SPLIT = ("ingress", "flusher", "flusher", "sweeper", "notifier", "scheduler")
RESULTS: list[checker.Tally] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    """The fault table, printed once the module's scenarios ran (`just faults` shows it)."""
    yield
    if RESULTS:
        columns = list(RESULTS[0].row())
        print("\n| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for tally in RESULTS:
            print("| " + " | ".join(str(v) for v in tally.row().values()) + " |")


class Fleet:
    """`streamsvc run` processes of one database and prefix, each on its own HTTP port."""

    def __init__(self, database: str, prefix: str, workdir: Path, **overrides: str) -> None:
        self.database, self.prefix, self.workdir = database, prefix, workdir
        self.overrides = overrides
        self.processes: list[tuple[str, ServiceProcess]] = []

    def add(self, role: str) -> ServiceProcess:
        env = settings_env(self.database, self.prefix, **self.overrides)
        workdir = self.workdir / f"{len(self.processes)}-{role}"
        workdir.mkdir()
        process = ServiceProcess(env, workdir)
        self.processes.append((role, process))
        return process

    async def start(self, *roles: str) -> None:
        await start_together(
            [functools.partial(self.add(role).start, "--role", role) for role in roles]
        )

    def doors(self) -> list[str]:
        """The HTTP bases of the processes that take operations."""
        return [
            f"http://127.0.0.1:{p.env['STREAMSVC_HTTP_PORT']}"
            for role, p in self.processes
            if role in ("ingress", "all")
        ]

    async def kill_and_restart(self, rng: random.Random) -> str:
        role, process = rng.choice(self.processes)
        process.kill()
        await process.start("--role", role)
        return role

    def stop(self) -> None:
        for _, process in self.processes:
            process.stop()

    async def terminate(self) -> list[int]:
        return [await process.terminate() for _, process in self.processes]


FLEET = {
    "STREAMSVC_CLAIM_IDLE_MS": "30000",  # the heartbeat, not the idle rule, takes over
    "BATCH_PROCESS_OPERATION_LIMIT": "500",
    "BATCH_PROCESS_OPERATION_INTERVAL": "1000",
}


@pytest.fixture
def fleet(database: str, prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(database, prefix, tmp_path, **FLEET)
    yield made
    made.stop()


@pytest.fixture
def cluster_fleet(
    database: str, prefix: str, tmp_path: Path, redis_cluster: cluster.Cluster
) -> Iterator[Fleet]:
    """A fleet in cluster mode, on the module's three-master Redis Cluster."""
    made = Fleet(
        database,
        prefix,
        tmp_path,
        REDIS_URL=redis_cluster.url,
        STREAMSVC_REDIS_CLUSTER="on",
        **FLEET,
    )
    yield made
    made.stop()


@pytest.fixture
async def inbox_node(redis_cluster: cluster.Cluster, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the master that holds the inbox's slot (the producers' connection)."""
    inbox = rs.Names(prefix).inbox
    port = redis_cluster.owner(key_slot(inbox.encode()))
    client = rs.connect(f"redis://127.0.0.1:{port}/0")
    yield client
    await client.aclose()


async def submit(
    fleet: Fleet, redis: aioredis.Redis, ops: list[dict[str, Any]], *, inbox: bool = True
) -> None:
    """Half through the inbox (none, without ``inbox``), the rest over HTTP in lists of
    100, a chunk at a time while the faults go on; an HTTP list that got no answer (its
    process was killed, a server was away) is sent again to another door: the
    userOperationIds make it stored once."""
    stream = rs.Names(fleet.prefix).inbox
    async with producer(redis, stream) as send, httpx.AsyncClient(timeout=10) as http:
        for start in range(0, len(ops), 200):
            chunk = ops[start : start + 200]
            if inbox:
                await send(chunk[:100], pipeline=100)
            body = chunk[100:] if inbox else chunk
            while body:
                door = random.choice(fleet.doors())
                try:
                    answer = await http.post(f"{door}/api/operations/batch", json=body)
                    if answer.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)
            await anyio.sleep(0.01)


async def settle(conn: asyncpg.Connection, scenario: str, events: checker.Events) -> None:
    """Until every submitted operation finished and was announced (or time runs out)."""
    wanted = [checker.user_id(scenario, i) for i in range(N)]

    async def finished() -> bool:
        done = await conn.fetchval(
            """SELECT count(*) FROM "BatchOperations" WHERE user_operation_id = ANY($1::uuid[])
               AND status IN ('SUCCESS', 'FAIL')""",
            wanted,
        )
        return bool(done == N) and sum(1 for u in wanted if events.seen[u]) == N

    await eventually(finished, within=180 if FULL else 90, every=0.25)


async def verdict(database: str, scenario: str, events: checker.Events) -> None:
    """The checker's line for the scenario, on a connection of its own (a restart may have
    cut the test's)."""
    conn = await asyncpg.connect(database=database, **PG)
    try:
        with contextlib.suppress(AssertionError):  # the checker says what is missing
            await settle(conn, scenario, events)
        tally = await checker.check(conn, scenario, N, events)
        RESULTS.append(tally)
        print(f"fault: {tally.row()}")
        assert tally.clean, (tally, await checker.troubles(conn, scenario, N))
    finally:
        await conn.close()


@asynccontextmanager
async def stage(
    conn: asyncpg.Connection, fleet: Fleet, scenario: str
) -> AsyncIterator[checker.Events]:
    await mixed.seed(conn, mixed.build(0))
    await checker.seed(conn)
    exchange = fleet.overrides.get("STREAMSVC_EVENTS_EXCHANGE", f"{fleet.prefix}-events")
    async with checker.collecting(exchange) as events:
        yield events


async def while_submitting(
    fleet: Fleet,
    redis: aioredis.Redis,
    scenario: str,
    fault: Callable[[], Any],
    *,
    inbox: bool = True,
) -> None:
    """Submit the scenario's workload while ``fault()`` runs beside it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(fault)
        await submit(fleet, redis, checker.workload(scenario, N), inbox=inbox)


# -- the scenarios -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["split", "all"])
async def test_sigkill_of_random_processes_at_random_instants(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis, shape: str
) -> None:
    await sigkills(fleet, conn, redis, f"sigkill-{shape}", shape)


async def test_sigkill_on_a_redis_cluster(
    cluster_fleet: Fleet, conn: asyncpg.Connection, inbox_node: aioredis.Redis
) -> None:
    """The same kills, roles split, in cluster mode: three shards on three masters."""
    await sigkills(cluster_fleet, conn, inbox_node, "sigkill-cluster", "split")


async def test_a_slot_moved_between_masters_mid_run(
    cluster_fleet: Fleet,
    conn: asyncpg.Connection,
    inbox_node: aioredis.Redis,
    redis_cluster: cluster.Cluster,
) -> None:
    """Each shard's slot moves to the next master while two processes work (resharding as
    `redis-cli --cluster reshard` does it): nothing is lost or applied twice."""
    shards = rs.Names.layout(cluster_fleet.prefix, shards=3, cluster=True).shards
    moved: list[int] = []

    async def reshard() -> None:
        for shard in shards * (3 if FULL else 1):
            await anyio.sleep(0.5)
            slot = key_slot(shard.work.encode())
            ports = redis_cluster.ports
            to = ports[(ports.index(redis_cluster.owner(slot)) + 1) % len(ports)]
            moved.append(await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, to))

    await two_processes_under(cluster_fleet, conn, inbox_node, "cluster-reshard", reshard)
    assert len(moved) >= 3 and all(moved), f"keys moved with each slot: {moved}"


async def sigkills(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis, scenario: str, shape: str
) -> None:
    """Processes (``shape``: roles split, or three ``--role all``) killed at random instants
    and started again, while the scenario's workload is submitted; the checker's verdict."""
    roles = SPLIT if shape == "split" else ("all", "all", "all")
    async with stage(conn, fleet, scenario) as events:
        await fleet.start(*roles)
        rng = random.Random(N)

        async def kills() -> None:
            for _ in range(KILLS):
                await anyio.sleep(rng.uniform(0.3, 1.5))
                await fleet.kill_and_restart(rng)

        started = time.monotonic()
        await while_submitting(fleet, redis, scenario, kills)
        await verdict(fleet.database, scenario, events)
        print(f"fault: {scenario} took {time.monotonic() - started:.1f} s")
    assert set(await fleet.terminate()) == {0}


async def two_processes_under(
    fleet: Fleet,
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scenario: str,
    fault: Callable[[], Any],
    *,
    inbox: bool = True,
) -> None:
    """Two `--role all` processes take the scenario's workload while ``fault()`` runs; the
    checker's verdict; both stop cleanly after."""
    async with stage(conn, fleet, scenario) as events:
        await fleet.start("all", "all")
        await while_submitting(fleet, redis, scenario, fault, inbox=inbox)
        await verdict(fleet.database, scenario, events)
    assert set(await fleet.terminate()) == {0}


async def test_postgresql_connections_terminated_mid_transaction(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis, database: str
) -> None:
    async def cut() -> None:
        for _ in range(KILLS * 3):
            await anyio.sleep(0.3)
            await conn.execute(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE datname = $1 AND pid <> pg_backend_pid()""",
                database,
            )

    await two_processes_under(fleet, conn, redis, "pg-terminated", cut)


async def test_sigterm_under_load_drains_and_exits_zero(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    async def stop_one() -> None:
        await anyio.sleep(0.5)
        _, process = fleet.processes[0]
        assert await process.terminate() == 0, "drained within the grace period"
        await process.start("--role", "all")

    await two_processes_under(fleet, conn, redis, "sigterm", stop_one)


async def test_postgresql_restarted_mid_run(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    async def restart() -> None:
        await anyio.sleep(0.5)
        await servers.restart_postgresql()

    await two_processes_under(fleet, conn, redis, "pg-restart", restart)


async def test_redis_restarted_with_no_data_under_load(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    """Over HTTP only: inbox entries not yet stored live only in Redis (docs/design.md, "Redis
    is not the record"), so an empty Redis loses those by design."""

    async def restart() -> None:
        await anyio.sleep(0.5)
        await servers.restart_redis_empty(down_s=2)

    await two_processes_under(fleet, conn, redis, "redis-restart", restart, inbox=False)


@asynccontextmanager
async def rpc_caller(queue: str) -> AsyncIterator[tuple[Callable[[dict[str, Any]], Any], set[str]]]:
    """A caller whose requests and reply queue outlive a broker stop: it publishes
    `create_operation` requests persistent, to the durable RPC queue, with a durable reply
    queue of its own (NestJS's ClientRMQ takes a named replyQueue the same way); yields
    ``send(op)`` and the correlation ids answered so far."""
    answered: set[str] = set()
    connection = await aio_pika.connect_robust(RMQ_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        replies = await channel.declare_queue(f"{queue}-replies", durable=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                if json.loads(message.body).get("response", {}).get("status"):
                    answered.add(message.correlation_id or "")

        await replies.consume(on_reply)

        async def send(op: dict[str, Any]) -> str:
            request_id = str(uuid.uuid4())
            body = {"pattern": "create_operation", "data": op, "id": request_id}
            message = aio_pika.Message(
                json.dumps(body).encode(),
                correlation_id=request_id,
                reply_to=replies.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, routing_key=queue)
            return request_id

        try:
            yield send, answered
        finally:
            await replies.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


async def test_rabbitmq_stopped_then_back(
    fleet: Fleet, conn: asyncpg.Connection, redis: aioredis.Redis, prefix: str
) -> None:
    """RPC requests in flight when the broker goes away are answered once it is back, each
    stored once; HTTP and the inbox keep taking operations meanwhile; every outcome is
    published once it is back."""
    scenario = "rabbitmq-stop"
    ops = checker.workload(scenario, N)
    by_rpc = 200  # the first ones, sent as single requests just before the stop
    async with (
        stage(conn, fleet, scenario) as events,
        rpc_caller(f"{prefix}-rpc") as (send, answered),
    ):
        await fleet.start("all", "all")
        requests = [await send(op) for op in ops[:by_rpc]]
        back_at: list[float] = []

        async def stop() -> None:
            await servers.stop_rabbitmq_for(60 if FULL else 10)
            back_at.append(time.monotonic())

        async def accepting() -> None:
            await anyio.sleep(0.5)
            await submit(fleet, redis, ops[by_rpc:])
            assert not back_at, "every operation was accepted while the broker was away"

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            await accepting()
        await verdict(fleet.database, scenario, events)

        async def all_answered() -> bool:
            return answered.issuperset(requests)

        await eventually(all_answered, within=60)
    assert set(await fleet.terminate()) == {0}
