"""Shared fixtures: each test gets its own PostgreSQL database and Redis key prefix.

The servers are the benchmarks' (benchmarks.harness: PG, REDIS_URL, RMQ_URL), read from the
service's own variables."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis

from benchmarks import workload
from benchmarks.harness import PG as PG
from benchmarks.harness import REDIS_URL, free_port
from benchmarks.harness import RMQ_URL as RMQ_URL
from streamsvc import settings as settings_module
from streamsvc.adapters import caller_role, postgres
from streamsvc.adapters import streams as rs
from streamsvc.allowlist import AllowList
from streamsvc.settings import Settings
from tests import cluster
from tests.pipeline import Served, served_with_clients

ALLOWED = f"{workload.ALLOWED}, profiles(id, name)"
SECRET = "test-secret-that-is-at-least-32-bytes-long"  # API_KEY_ENCRYPTION_SECRET: >= 32 bytes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh database with the target tables, migrated, its caller role granted what
    ALLOWED needs, dropped afterwards."""
    name = f"streamsvc_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database="postgres", **PG)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(database=name, **PG)
        try:
            await conn.execute(workload.SCHEMA)
            await postgres.migrate(conn)
            await caller_role.sync(conn, caller_role.DEFAULT, AllowList.parse(ALLOWED))
        finally:
            await conn.close()
    finally:
        await admin.close()
    try:
        yield name
    finally:  # a connection of its own: the test may have restarted the server
        admin = await asyncpg.connect(database="postgres", **PG)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def settings_env(database: str, prefix: str, **overrides: str) -> dict[str, str]:
    """The variables a test service runs with: its own database and Redis prefix."""
    return {
        "DB_HOST": str(PG["host"]),
        "DB_PORT": str(PG["port"]),
        "DB_USERNAME": PG["user"],
        "DB_NAME": database,
        "REDIS_URL": REDIS_URL,
        "STREAMSVC_REDIS_PREFIX": prefix,
        "BATCH_SERVICE_RMQ_QUEUE": f"{prefix}-rpc",
        "STREAMSVC_EVENTS_EXCHANGE": f"{prefix}-events",
        "STREAMSVC_HTTP_HOST": "127.0.0.1",
        "STREAMSVC_HTTP_PORT": str(free_port()),
        "STREAMSVC_AUTH": "off",
        "STREAMSVC_ALLOWED_TABLES": ALLOWED,
        "BATCH_PROCESS_OPERATION_INTERVAL": "500",
        "STREAMSVC_CLAIM_IDLE_MS": "2000",
        "STREAMSVC_RETRY_BASE_MS": "10",
        "LOG_LEVEL": "warning",
        **overrides,
    }


def make_settings(database: str, prefix: str, **overrides: str) -> Settings:
    return settings_module.load(settings_env(database, prefix, **overrides), env_file=None)


def keyed_settings(database: str, prefix: str, **overrides: str) -> Settings:
    """Settings with auth on: callers need keys (``service.keys.create``)."""
    return make_settings(
        database, prefix, STREAMSVC_AUTH="on", API_KEY_ENCRYPTION_SECRET=SECRET, **overrides
    )


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of the test's own; its keys are deleted afterwards."""
    value = f"streamsvc-test-{uuid.uuid4().hex[:10]}"
    yield value
    client = rs.connect(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{value}:*")]
        keys += [k async for k in client.scan_iter(match=f"{{{value}:*")]  # shards' keys
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{value}-rpc")
        await channel.exchange_delete(f"{value}-events")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    """A Redis Cluster of three masters of the module's own (tests.cluster)."""
    with cluster.started(tmp_path_factory.mktemp("redis-cluster")) as made:
        yield made


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's own database."""
    connection = await asyncpg.connect(database=database, **PG)
    yield connection
    if not connection.is_closed():
        await connection.close()


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis (keys under the test's ``prefix`` are its own)."""
    client = rs.connect(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def settings(database: str, prefix: str) -> Settings:
    return make_settings(database, prefix)


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    """A serving service (auth off) with a client for each door and its database."""
    async with served_with_clients(settings) as served:
        yield served


NESTJS = Path(__file__).resolve().parent / "nestjs"
NPM_TIMEOUT_S = 300


def _needs_install() -> bool:
    """node_modules is missing or older than the lock file it was installed from."""
    lock = NESTJS / "package-lock.json"
    installed = NESTJS / "node_modules" / ".package-lock.json"
    if not installed.exists():
        return True
    return lock.exists() and installed.stat().st_mtime < lock.stat().st_mtime


@pytest.fixture(scope="session")
def nestjs() -> Iterator[Path]:
    """tests/nestjs with its packages installed (the NestJS interop test, the bench's
    ClientRMQ); skips when node or npm is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node is not installed: the NestJS interop test needs it (node and npm)")
    if _needs_install():
        command = "ci" if (NESTJS / "package-lock.json").exists() else "install"
        try:
            done = subprocess.run(
                [npm, command, "--no-audit", "--no-fund"],
                cwd=NESTJS,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"npm {command} took more than {NPM_TIMEOUT_S} s:\n{exc.output}")
        if done.returncode != 0:
            pytest.fail(
                f"npm {command} failed ({done.returncode}) in {NESTJS}:\n"
                f"{done.stdout}\n{done.stderr}"
            )
    yield NESTJS
