"""Build the clients, then run the actors in one anyio task group.

Stopping is not cancelling: on SIGTERM or SIGINT the actors stop claiming, in-flight
batches finish (their commit and ack run shielded), and only after
``shutdown_grace_s`` is anything cancelled. The sweeper survives blips on its own; the
flushers, the inbox consumer and the committers are fatal when they fail. Retention runs
beside the sweeper and survives blips the same way.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import asyncpg
import structlog

from streamsvc import tracing
from streamsvc.actors.flusher import Flusher
from streamsvc.actors.heartbeat import Heartbeat, process_name
from streamsvc.actors.ingress import Ingress
from streamsvc.actors.notifier import Notifier
from streamsvc.actors.retention import Retention
from streamsvc.actors.scheduler import Scheduler
from streamsvc.actors.sweeper import Sweeper
from streamsvc.adapters import postgres
from streamsvc.adapters import streams as rs
from streamsvc.api import http
from streamsvc.api.inbox import InboxConsumer
from streamsvc.api.rpc import RpcServer
from streamsvc.catalog import Catalog
from streamsvc.keys import Authenticator, KeyStore
from streamsvc.model import Operation, Receipt, Rejection
from streamsvc.pacing import Pacer
from streamsvc.policy import RetryPolicy
from streamsvc.ratelimit import RateLimiter
from streamsvc.settings import Settings
from streamsvc.store.postgres import PgStore
from streamsvc.validate import Caller

log = structlog.get_logger("streamsvc.supervisor")

Role = Literal["all", "ingress", "flusher", "sweeper", "notifier", "scheduler"]
ROLES: tuple[Role, ...] = ("all", "ingress", "flusher", "sweeper", "notifier", "scheduler")

# Who submits recurring operations (STREAMSVC_SCHEDULES): configuration, not a caller, so
# every allowed table; the same name in every process, so each tick's id is the same too.
SCHEDULES = Caller(name="streamsvc:schedules", admin=True)


@dataclass
class Service:
    """Everything one process runs, wired together; tests drive it directly."""

    settings: Settings
    pool: asyncpg.Pool
    streams: rs.Streams
    catalog: Catalog
    ingress: Ingress
    inbox: InboxConsumer
    flushers: list[Flusher]
    sweeper: Sweeper
    scheduler: Scheduler
    rpc: RpcServer
    notifiers: list[Notifier]  # one for each shard's outcome stream
    keys: KeyStore | None
    http: http.Server
    retention: Retention
    heartbeat: Heartbeat
    stopping: anyio.Event = field(default_factory=anyio.Event)

    def stop_claiming(self) -> None:
        self.inbox.stopping = True
        for flusher in self.flushers:
            flusher.stopping = True
        self.scheduler.stop()
        self.rpc.stop()
        for notifier in self.notifiers:
            notifier.stop()
        self.http.should_exit = True
        self.stopping.set()


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.max_attempts, settings.retry_base_ms, settings.retry_cap_ms)


def streams_of(settings: Settings) -> rs.Streams:
    """The streams ``settings`` lay out, on a new client (closed by the caller:
    ``streams.redis.aclose()``; ``streams.open()`` before use)."""
    return rs.open_streams(
        settings.redis_url,
        settings.redis_prefix,
        shards=settings.shards,
        cluster=settings.cluster_on,
        maxlen=settings.stream_maxlen,
    )


@asynccontextmanager
async def open_service(settings: Settings, role: Role = "all") -> AsyncIterator[Service]:
    """Connect, check the database, load the catalog, and build the actors (``role``: the
    ones this process runs)."""
    settings.check_auth()
    settings.check_redis()
    pool = await postgres.create_pool(settings, flushing=role in ("all", "flusher"))
    streams = streams_of(settings)
    client = streams.redis
    limiter: RateLimiter | None = None
    try:
        await streams.open()
        async with pool.acquire() as conn:
            await postgres.check_migrated(conn)
            catalog = Catalog(settings.allow_list)
            await catalog.load(conn)
            keys = None
            if settings.auth_on:
                keys = KeyStore(settings.api_key_secret, settings.allow_list)
                await keys.load(conn)
        _warn_about_allow_list(catalog)
        retry = retry_policy(settings)
        limiter = RateLimiter(
            client,
            prefix=settings.redis_prefix,
            default_ops=settings.rate_limit_ops,
            cluster_url=settings.redis_url if settings.cluster_on else None,
        )
        auth = Authenticator(keys, limiter)
        base = process_name()  # consumers are named <process>/<actor> (actors.heartbeat)
        store = PgStore(pool, catalog)
        ingress = Ingress(
            store,
            pool,
            streams,
            catalog,
            chunk=settings.batch_limit,
            pacer=Pacer(settings.intake_gather_ms),
        )
        inbox = InboxConsumer(
            rs.consumer_name(base, "inbox"),
            ingress,
            streams,
            auth,
            retry,
            count=settings.ingress_read_count,
            claim_idle_ms=settings.claim_idle_ms,
            max_body_bytes=settings.max_body_bytes,
            readers=settings.inbox_readers,
            heartbeat_ms=settings.heartbeat_ms,
            pacer=Pacer(settings.gather_ms),
        )
        # Every shard has flushers in every process that runs them (README, Scaling out).
        shards = streams.names.shards
        pacers = [Pacer(settings.gather_ms) for _ in shards]  # a shard's flushers share one
        flushers = [
            Flusher(
                rs.consumer_name(base, f"flusher-{n}"),
                store,
                streams.on(shards[n % len(shards)]),
                retry,
                limit=settings.batch_limit,
                keep_claimed_s=settings.claim_idle_ms / 3000,
                pacer=pacers[n % len(shards)],
            )
            for n in range(max(settings.flushers, len(shards)))
        ]
        sweeper = Sweeper(
            rs.consumer_name(base, "sweeper"),
            store,
            streams,
            interval_ms=settings.interval_ms,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            chunk=settings.batch_limit,
            heartbeat_ms=settings.heartbeat_ms,
        )

        async def submit_tick(op: Operation) -> Receipt | Rejection:
            (result,) = await ingress.submit([op], caller=SCHEDULES, source="schedule")
            return result

        scheduler = Scheduler(
            store,
            streams,
            chunk=settings.batch_limit,
            poll_ms=settings.scheduler_poll_ms,
            lookahead_ms=settings.lookahead_ms,
            schedules=list(settings.schedules.values()),
            submit=submit_tick,
        )
        ingress.on_held = scheduler.held_until
        rpc = RpcServer(
            ingress,
            auth,
            retry,
            url=settings.rmq_url,
            queue=settings.rmq_queue,
            durable=settings.rmq_queue_durable,
            prefetch=settings.rpc_prefetch,
            max_body_bytes=settings.max_body_bytes,
            max_message_bytes=settings.amqp_max_message_bytes,
        )
        notifiers = [
            Notifier(
                rs.consumer_name(base, "notifier" if shard.shard == 0 else f"notifier-{n}"),
                streams.on(shard),
                retry,
                url=settings.rmq_url,
                exchange=settings.events_exchange,
                routes=settings.notify_routes,
                mode=settings.notify_mode,
                durable_queues=settings.rmq_queue_durable,
                max_message_bytes=settings.amqp_max_message_bytes,
                heartbeat_ms=settings.heartbeat_ms,
            )
            for n, shard in enumerate(shards)
        ]

        async def ready() -> list[str]:
            return await unavailable(pool, client)

        app = http.create_app(
            ingress,
            auth,
            ready,
            max_body_bytes=settings.max_body_bytes,
            schedules=list(settings.schedules.values()),
        )
        web = http.server(app, host=settings.http_host, port=settings.http_port)
        yield Service(
            settings,
            pool,
            streams,
            catalog,
            ingress,
            inbox,
            flushers,
            sweeper,
            scheduler,
            rpc,
            notifiers,
            keys,
            web,
            Retention(
                store,
                streams,
                older_than_s=settings.retention_s,
                batch=settings.retention_batch,
                interval_ms=settings.interval_ms,
            ),
            Heartbeat(client, streams.names, base, every_ms=settings.heartbeat_ms),
        )
    finally:
        if limiter is not None:
            await limiter.aclose()
        await client.aclose()
        await pool.close()


READY_TIMEOUT_S = 2.0


async def unavailable(
    pool: asyncpg.Pool, client: Any, *, timeout_s: float = READY_TIMEOUT_S
) -> list[str]:
    """The servers this process cannot reach now (``postgresql``, ``redis``), each checked
    within ``timeout_s``; empty when ready. Only names: why is for the logs, never for an
    unauthenticated probe."""

    async def postgresql() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def redis() -> None:
        await client.ping()

    down: list[str] = []

    async def probe(name: str, check: Callable[[], Awaitable[None]]) -> None:
        try:
            with anyio.fail_after(timeout_s):
                await check()
        except Exception as exc:
            log.warning("ready.unavailable", server=name, error=str(exc) or type(exc).__name__)
            down.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe, "postgresql", postgresql)
        tg.start_soon(probe, "redis", redis)
    return sorted(down)


def _warn_about_allow_list(catalog: Catalog) -> None:
    if not catalog.allow:
        log.warning(
            "startup.no_tables_allowed",
            hint="STREAMSVC_ALLOWED_TABLES is empty: every structured or SQL "
            "operation will be refused",
        )
    for ref in catalog.missing_tables():
        log.warning(
            "startup.allowed_table_missing",
            table=str(ref),
            next="operations on it are refused until it exists",
        )


async def run(settings: Settings, role: Role = "all") -> None:
    """Run until SIGTERM/SIGINT, then drain within the grace period and return. Traced
    when the OTEL_* variables configure an exporter (streamsvc.tracing)."""
    if tracing.configure(max_links=settings.batch_limit):
        log.info("tracing.on", exporters=tracing.exporter_names(os.environ))
    try:
        await _run(settings, role)
    finally:
        tracing.shutdown()  # exports what is buffered


async def _run(settings: Settings, role: Role) -> None:
    async with open_service(settings, role) as service, anyio.create_task_group() as support:
        _freeze_start_up()
        # Committers and the sweeper serve the claimers; they go when the claimers are done.
        if role in ("all", "ingress", "scheduler"):  # the scheduler submits recurring ones
            support.start_soon(service.ingress.run)
            support.start_soon(service.ingress.run)
        await service.heartbeat.beat()  # alive before any of its consumers takes work
        support.start_soon(service.heartbeat.run)
        if role in ("all", "sweeper"):
            support.start_soon(service.sweeper.run)
            support.start_soon(service.sweeper.run_take_over)
            support.start_soon(service.retention.run)
        if service.keys is not None:
            support.start_soon(service.keys.run, service.pool)
        async with anyio.create_task_group() as claimers:
            support.start_soon(_watch_signals, service, claimers.cancel_scope)
            claimers.start_soon(service.http.serve)  # every role: probes and /metrics
            if role in ("all", "ingress"):
                claimers.start_soon(service.inbox.run)
                claimers.start_soon(service.rpc.run)
            if role in ("all", "notifier"):
                for notifier in service.notifiers:
                    claimers.start_soon(notifier.run)
            if role in ("all", "flusher"):
                for flusher in service.flushers:
                    claimers.start_soon(flusher.run)
            if role in ("all", "scheduler"):
                claimers.start_soon(service.scheduler.run)
            with anyio.move_on_after(10):  # started: its port answers (probes, the API)
                await service.http.listening.wait()
            log.info(
                "service.started",
                role=role,
                flushers=len(service.flushers),
                tables=[str(t) for t in service.catalog.tables],
            )
            if role == "sweeper":
                await service.stopping.wait()
        support.cancel_scope.cancel()
        await service.heartbeat.stop()
    log.info("service.stopped")


def _freeze_start_up() -> None:
    """What start-up built (modules, the SQL parser's tables, clients, the catalog) lives as
    long as the process: leave it out of the cyclic collector's full passes, which would
    otherwise walk all of it every few hundred milliseconds under load. And collect the
    youngest generation every 10,000 allocations (Python's default is 700): a batch's
    objects live for milliseconds, and each young pass walks those still alive (and moves
    them on to the older generations, whose passes then come sooner)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


# A second signal this soon after the first is the same request delivered twice: Ctrl-C
# in a terminal reaches the whole process group, and `just run` forwards it again.
SAME_REQUEST_S = 1.0


async def _watch_signals(service: Service, claimers: anyio.CancelScope) -> None:
    """First signal: stop claiming and let in-flight batches finish; after the grace
    period (or a second signal, a moment later) cancel whatever is still running."""
    grace = service.settings.shutdown_grace_s
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "service.stopping",
                signal=signal.Signals(signum).name,
                next=f"finishing in-flight batches, at most {grace} s",
            )
            service.stop_claiming()
            break
        first = time.monotonic()
        with anyio.move_on_after(grace):
            async for _ in signals:
                if time.monotonic() - first >= SAME_REQUEST_S:
                    break
    log.warning("service.grace_expired", next="cancelling in-flight work")
    claimers.cancel()
