"""Safe defaults: readiness names what is down (never why), and the one stream anyone can
grow from outside is capped while the ones holding work are never trimmed."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from benchmarks import workload
from benchmarks.harness import REDIS_URL
from streamsvc.adapters import postgres
from streamsvc.adapters import streams as rs
from streamsvc.model import Receipt
from streamsvc.validate import ANONYMOUS
from tests.conftest import PG, make_settings
from tests.faults import tcp_proxy
from tests.pipeline import drain, eventually, ops, order, running, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
# What the README's "Least privilege" section has an operator grant on target tables.
GRANTS = """
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"
    WITH GRANT OPTION;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}" WITH GRANT OPTION;
"""


async def test_readyz_names_the_server_that_is_down_and_nothing_else(
    database: str, prefix: str
) -> None:
    async with (
        tcp_proxy(str(PG["host"]), int(PG["port"])) as pg,
        tcp_proxy("127.0.0.1", 6379) as redis,
    ):
        settings = make_settings(
            database,
            prefix,
            DB_PORT=str(pg.port),
            REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        )
        base = f"http://127.0.0.1:{settings.http_port}"
        async with serving(settings), httpx.AsyncClient(base_url=base, timeout=10) as client:
            ready = await client.get("/readyz")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

            async def answers(down: list[str]) -> bool:
                response = await client.get("/readyz")
                body = {"status": "unavailable", "down": down}
                return response.status_code == 503 and response.json() == body

            redis.down()
            await eventually(lambda: answers(["redis"]), within=10)
            pg.down()
            await eventually(lambda: answers(["postgresql", "redis"]), within=10)
            redis.up()
            await eventually(lambda: answers(["postgresql"]), within=10)
            text = (await client.get("/readyz")).text
            assert "Error" not in text and "refused" not in text and "connect" not in text
            pg.up()

            async def ready_again() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready_again, within=10)


async def test_rejects_are_capped_at_each_add_and_no_other_stream_is(prefix: str) -> None:
    """Anyone who reaches the inbox writes rejects, so each XADD caps them. Dead letters and
    outcomes wait for retention, which never drops what a consumer group still needs
    (tests/integration/test_stream_trim.py); the inbox and the work stream hold work."""
    client = rs.connect(REDIS_URL)
    names = rs.Names(prefix)
    streams = rs.Streams(client, names, maxlen=10)
    try:
        for stream in (names.rejects, names.dead, names.outcomes, names.work, names.inbox):
            await streams.add(stream, [{"n": str(i)} for i in range(1000)])
        # MAXLEN ~ trims whole nodes of the stream (100 entries by default): about 10 left.
        assert 10 <= await streams.length(names.rejects) <= 110
        last = await client.xrevrange(names.rejects, count=1)
        assert last is not None
        assert last[0][1] == {b"n": b"999"}  # trimming drops the oldest
        await streams.ack_with(names.work, rs.FLUSHER_GROUP, [], names.dead, [{"n": "last"}])
        assert await streams.length(names.dead) == 1001
        for stream in (names.outcomes, names.work, names.inbox):
            assert await streams.length(stream) == 1000, stream
    finally:
        await client.aclose()


async def test_an_outcome_trimmed_while_pending_reads_as_an_empty_entry(prefix: str) -> None:
    client = rs.connect(REDIS_URL)
    names = rs.Names(prefix)
    streams = rs.Streams(client, names, maxlen=10)
    try:
        await streams.ensure_group(names.outcomes, rs.NOTIFIER_GROUP)
        [entry] = await streams.add(names.outcomes, [{"o": b"x"}])
        read = await streams.read(names.outcomes, rs.NOTIFIER_GROUP, "n", count=10, block_ms=None)
        assert read == [(entry, {b"o": b"x"})]
        await client.xtrim(names.outcomes, maxlen=0)  # as MAXLEN does under a flood
        again = await streams.read(
            names.outcomes, rs.NOTIFIER_GROUP, "n", count=10, block_ms=None, own_pending=True
        )
        assert again == [(entry, {})]
    finally:
        await client.aclose()


async def test_the_service_runs_as_the_least_privileged_role_compose_creates() -> None:
    """deploy/postgres/10-streamsvc-role.sh, as the postgres image runs it, then the grants
    the README gives for target tables: the role is no superuser, and migrates, stores and
    applies all the same."""
    suffix = uuid.uuid4().hex[:12]
    database, role = f"streamsvc_t_{suffix}", f"streamsvc_r_{suffix}"
    admin = await asyncpg.connect(database="postgres", **PG)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        script = ROOT / "deploy" / "postgres" / "10-streamsvc-role.sh"
        env = {
            "PATH": "/usr/bin:/bin",
            "PGHOST": str(PG["host"]),
            "PGPORT": str(PG["port"]),
            "POSTGRES_USER": PG["user"],
            "POSTGRES_DB": database,
            "SERVICE_DB_USER": role,
            "SERVICE_DB_PASSWORD": "not-used-with-trust-auth",
        }
        done = await anyio.run_process(["sh", str(script)], env=env, check=False)
        assert done.returncode == 0, done.stderr.decode()
        rights = await admin.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
            "WHERE rolname = $1",
            role,
        )
        assert rights is not None and not any(rights)

        owner = await asyncpg.connect(database=database, **PG)  # the tables' owner
        try:
            await owner.execute(workload.SCHEMA)
            await owner.execute(GRANTS.format(role=role))
        finally:
            await owner.close()
        service_conn = await asyncpg.connect(database=database, **{**PG, "user": role})
        try:
            assert await service_conn.fetchval("SELECT current_user") == role
            await postgres.migrate(service_conn)
        finally:
            await service_conn.close()
        prefix = f"streamsvc-test-{suffix}"
        settings = make_settings(database, prefix, DB_USERNAME=role)
        async with running(settings) as service:
            [receipt] = await service.ingress.submit(
                ops([order(1)]), caller=ANONYMOUS, source="test"
            )
            assert isinstance(receipt, Receipt)
            await drain(service)
            view = await service.ingress.get(receipt.id)
            assert view is not None and view.status == "SUCCESS"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()
        client = rs.connect(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"streamsvc-test-{suffix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
