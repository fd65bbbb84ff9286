"""The `streamsvc` command: migrate, start-up refusals, one-line setting errors."""

from __future__ import annotations

import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import anyio
import asyncpg
import pytest

from tests.conftest import PG, SECRET, settings_env

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def streamsvc(env: dict[str, str], cwd: Path, *args: str) -> Result:
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "streamsvc", *args],
            env={"PATH": "/usr/bin:/bin", **env},
            cwd=cwd,
            check=False,
        )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture
async def empty_database() -> str:  # type: ignore[misc]
    name = f"streamsvc_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database="postgres", **PG)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrate_creates_only_its_own_tables_and_is_safe_to_rerun(
    empty_database: str, tmp_path: Path
) -> None:
    env = settings_env(empty_database, "unused")
    first = await streamsvc(env, tmp_path, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied: 001_batch_operations.sql, 002_api_keys.sql, 003_" in first.stdout
    again = await streamsvc(env, tmp_path, "migrate")
    assert again.returncode == 0, again.stderr
    assert "database is up to date" in again.stdout
    conn = await asyncpg.connect(database=empty_database, **PG)
    try:
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    assert tables == {
        "BatchOperations",
        "streamsvc_migrations",
        "streamsvc_api_keys",
        "streamsvc_schedule_ticks",
        "streamsvc_paused_types",
        "streamsvc_announced",
    }


async def test_run_refuses_an_unmigrated_database(empty_database: str, tmp_path: Path) -> None:
    result = await streamsvc(settings_env(empty_database, "unused"), tmp_path, "run")
    assert result.returncode == 2
    assert "database is not migrated" in result.stderr
    assert "streamsvc migrate" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DB_PORT", "many", "streamsvc: DB_PORT: expected `int`, got `str`"),
        ("STREAMSVC_FLUSHERS", "0", "streamsvc: STREAMSVC_FLUSHERS: expected `int` >= 1"),
        ("LOG_LEVEL", "loud", "streamsvc: LOG_LEVEL: invalid enum value 'loud'"),
    ],
)
async def test_a_bad_setting_stops_start_up_with_one_line(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    result = await streamsvc({variable: value}, tmp_path, "run")
    assert result.returncode == 2
    assert result.stderr.strip() == message


async def test_settings_come_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DB_PORT=notaport\n")
    result = await streamsvc({}, tmp_path, "migrate")
    assert result.returncode == 2
    assert "DB_PORT" in result.stderr


async def test_keys_are_created_shown_once_listed_and_revoked(
    database: str, tmp_path: Path
) -> None:
    env = {**settings_env(database, "unused"), "API_KEY_ENCRYPTION_SECRET": SECRET}
    created = await streamsvc(
        env,
        tmp_path,
        "keys",
        "create",
        "--name",
        "orders",
        "--tables",
        "orders,payments",
        "--actions",
        "insert,update",
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ssk_") and len(key) > 40
    listed = await streamsvc(env, tmp_path, "keys", "list")
    assert listed.stdout.split("\t") == [
        "orders",
        "active",
        "tables=orders,payments",
        "actions=insert,update",
        "rate=default\n",
    ]
    assert key not in listed.stdout
    twice = await streamsvc(env, tmp_path, "keys", "create", "--name", "orders")
    assert (twice.returncode, twice.stderr.strip()) == (
        2,
        "streamsvc: name: a key named 'orders' exists already",
    )
    revoked = await streamsvc(env, tmp_path, "keys", "revoke", "orders")
    assert revoked.stdout.strip() == "revoked orders"
    assert "\trevoked " in (await streamsvc(env, tmp_path, "keys", "list")).stdout


async def test_keys_with_admin_scope_and_their_own_rate(database: str, tmp_path: Path) -> None:
    env = {**settings_env(database, "unused"), "API_KEY_ENCRYPTION_SECRET": SECRET}
    for args in (("--name", "ops", "--admin"), ("--name", "batch", "--rate", "50")):
        created = await streamsvc(env, tmp_path, "keys", "create", *args)
        assert created.returncode == 0, created.stderr
    free = await streamsvc(env, tmp_path, "keys", "create", "--name", "free", "--rate", "0")
    assert free.returncode == 0, free.stderr
    rows = [
        line.split("\t")
        for line in (await streamsvc(env, tmp_path, "keys", "list")).stdout.splitlines()
    ]
    scopes = {row[0]: (row[3], row[4]) for row in rows}
    everything = "actions=delete,insert,update,upsert"
    assert scopes == {
        "batch": (everything, "rate=50/s"),
        "free": (everything, "rate=unlimited"),
        "ops": (f"{everything} admin", "rate=default"),
    }
    for bad, message in (
        (("--name", "anonymous"), "name: 'anonymous' cannot name a key"),
        (("--name", "x", "--rate", "-1"), "rate: operations per second cannot be negative"),
    ):
        refused = await streamsvc(env, tmp_path, "keys", "create", *bad)
        assert (refused.returncode, refused.stderr.strip()) == (2, f"streamsvc: {message}")


@pytest.mark.parametrize("command", [("run",), ("keys", "list")])
async def test_a_short_secret_is_refused_naming_the_variable(
    database: str, tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = {
        **settings_env(database, "unused"),
        "STREAMSVC_AUTH": "on",
        "API_KEY_ENCRYPTION_SECRET": "x" * 31,
    }
    result = await streamsvc(env, tmp_path, *command)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "streamsvc: API_KEY_ENCRYPTION_SECRET: 31 bytes is too short, at least 32 are required"
    )


async def test_auth_on_without_a_secret_is_one_clear_error(database: str, tmp_path: Path) -> None:
    env = {**settings_env(database, "unused"), "STREAMSVC_AUTH": "on"}
    result = await streamsvc(env, tmp_path, "run")
    assert result.returncode == 2
    assert result.stderr.startswith("streamsvc: API_KEY_ENCRYPTION_SECRET: required")


@pytest.mark.parametrize("spelling", ["production", "Production", "PRODUCTION"])
async def test_production_refuses_auth_off(database: str, tmp_path: Path, spelling: str) -> None:
    env = {**settings_env(database, "unused"), "NODE_ENV": spelling}
    result = await streamsvc(env, tmp_path, "run")
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "streamsvc: STREAMSVC_AUTH: cannot be off when NODE_ENV=production",
    )


async def test_status_shows_streams_counts_and_recent_failures(
    database: str, prefix: str, tmp_path: Path
) -> None:
    from streamsvc.validate import ANONYMOUS
    from tests.conftest import make_settings
    from tests.pipeline import drain, ops, running

    settings = make_settings(database, prefix)
    good = {
        "operationType": "OK",
        "table": "orders",
        "action": "insert",
        "values": {"id": 1, "customer": "c", "amount": 1},
    }
    bad = {**good, "operationType": "BROKEN", "values": {"id": 2, "customer": "c", "amount": -1}}
    async with running(settings) as service:
        await service.ingress.submit(ops([good, bad]), caller=ANONYMOUS, source="api")
        await drain(service)
    env = {**settings_env(database, prefix), "COLUMNS": "240"}
    result = await streamsvc(env, tmp_path, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for heading in ("Streams", "Consumers", "Operations", "Recent failures"):
        assert heading in out
    assert "outcomes" in out and re.search(r"flusher-\d", out), "no flusher among the consumers"
    assert "BROKEN" in out and "violates check constraint" in out
    assert re.search(r"SUCCESS\s*│\s*1\s*│", out) and re.search(r"FAIL\s*│\s*1\s*│", out)


async def test_ops_list_pages_newest_first_and_ops_counts_counts_by_status_and_type(
    database: str, prefix: str, tmp_path: Path
) -> None:
    import json

    from streamsvc.validate import ANONYMOUS
    from tests.conftest import make_settings
    from tests.pipeline import drain, ops, order, running

    settings = make_settings(database, prefix)
    async with running(settings) as service:
        for n in range(1, 4):  # one submission each: three creation times
            await service.ingress.submit(ops([order(n)]), caller=ANONYMOUS, source="api")
        await service.ingress.submit(ops([order(1)]), caller=ANONYMOUS, source="api")
        await drain(service)
    env = {**settings_env(database, prefix), "COLUMNS": "240"}
    first = await streamsvc(env, tmp_path, "ops", "list", "--limit", "2", "--json")
    assert first.returncode == 0, first.stderr
    page = json.loads(first.stdout)
    assert len(page["items"]) == 2 and page["nextCursor"]
    rest = await streamsvc(env, tmp_path, "ops", "list", "--json", "--cursor", page["nextCursor"])
    items = page["items"] + json.loads(rest.stdout)["items"]
    created = [item["createdAt"] for item in items]
    assert len(items) == 4 and created == sorted(created, reverse=True)
    failed = await streamsvc(env, tmp_path, "ops", "list", "--status", "FAIL")
    assert failed.returncode == 0 and "duplicate key" in failed.stdout, failed.stdout
    for args, field in ((("--limit", "0"), "limit"), (("--since", "yesterday"), "since")):
        refused = await streamsvc(env, tmp_path, "ops", "list", *args)
        assert refused.returncode == 2 and f"streamsvc: {field}:" in refused.stderr, args
    counts = await streamsvc(env, tmp_path, "ops", "counts", "--json")
    assert counts.returncode == 0, counts.stderr
    assert json.loads(counts.stdout)["byType"] == {"ORDER_CREATED": {"SUCCESS": 3, "FAIL": 1}}
    table = await streamsvc(env, tmp_path, "ops", "counts")
    assert "ORDER_CREATED" in table.stdout and "all" in table.stdout, table.stdout
    too_long = await streamsvc(env, tmp_path, "ops", "counts", "--since", "2000-01-01T00:00:00")
    assert too_long.returncode == 2 and "streamsvc: since: at most 31 days" in too_long.stderr


async def test_a_revoked_key_is_refused_within_seconds_by_a_running_service(
    database: str, prefix: str, tmp_path: Path
) -> None:
    import json
    import time

    from benchmarks.harness import ServiceProcess
    from streamsvc.adapters import streams as rs

    env = {
        **settings_env(database, prefix),
        "STREAMSVC_AUTH": "on",
        "API_KEY_ENCRYPTION_SECRET": SECRET,
    }
    key = (await streamsvc(env, tmp_path, "keys", "create", "--name", "app")).stdout.strip()
    service = ServiceProcess(env, tmp_path)
    redis = rs.connect("redis://127.0.0.1:6379/0")
    names = rs.Names(prefix)
    op = {
        "operationType": "OK",
        "table": "orders",
        "action": "insert",
        "values": {"id": 1, "customer": "c", "amount": 1},
    }
    try:
        await service.start()
        revoked = await streamsvc(env, tmp_path, "keys", "revoke", "app")
        assert revoked.returncode == 0
        started = time.monotonic()
        while True:  # entries with the key are accepted until the service reloads its keys
            entry = await redis.xadd(names.inbox, {"op": json.dumps(op), "key": key})
            with anyio.fail_after(10):
                while True:
                    entries = cast(
                        "list[tuple[bytes, dict[bytes, bytes]]]", await redis.xrange(names.rejects)
                    )
                    rejects = {f[b"entry"]: f for _, f in entries}
                    if entry in rejects or not await redis.xlen(names.inbox):
                        break
                    await anyio.sleep(0.05)
            if entry in rejects:
                assert rejects[entry][b"reason"] == b"key: unknown or revoked API key"
                break
            assert time.monotonic() - started < 10, "still accepted 10 s after revoking"
            await anyio.sleep(0.2)
    finally:
        service.stop()
        await redis.aclose()


async def test_replay_counts_then_replays_by_type_and_refuses_an_empty_selection(
    database: str, prefix: str, tmp_path: Path
) -> None:
    from streamsvc.model import ListQuery
    from streamsvc.validate import ANONYMOUS
    from tests.conftest import make_settings
    from tests.pipeline import drain, ops, order, running

    settings = make_settings(database, prefix)
    bad = [order(n, values={"id": n, "customer": "c", "amount": -1}) for n in (1, 2)]
    other = order(3, operationType="OTHER", values={"id": 3, "customer": "c", "amount": -1})
    async with running(settings) as service:
        await service.ingress.submit(ops([*bad, other]), caller=ANONYMOUS, source="api")
        await drain(service)
    env = settings_env(database, prefix)
    counted = await streamsvc(env, tmp_path, "replay", "--type", "ORDER_CREATED", "--dry-run")
    assert (counted.returncode, counted.stdout.strip()) == (0, "would replay 2 operations")
    replayed = await streamsvc(env, tmp_path, "replay", "--type", "ORDER_CREATED")
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "replayed 2 operations")
    conn = await asyncpg.connect(database=database, **PG)
    try:
        rows = await conn.fetch(
            """SELECT operation_type, status, jsonb_array_length(history) AS ended
               FROM "BatchOperations" ORDER BY operation_type"""
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        ("ORDER_CREATED", "UNPROCESSED", 1),
        ("ORDER_CREATED", "UNPROCESSED", 1),
        ("OTHER", "FAIL", 0),
    ]
    async with running(settings) as service:  # they are on the work streams: flushed again
        await drain(service)
        page = await service.ingress.list_operations(ListQuery())
    assert sorted((v.operation_type, v.attempts) for v in page.items) == [
        ("ORDER_CREATED", 2),
        ("ORDER_CREATED", 2),
        ("OTHER", 1),
    ]
    nothing = await streamsvc(env, tmp_path, "replay")
    assert nothing.returncode == 2 and "streamsvc: replay: name the operations" in nothing.stderr
    for args, field in ((("--since", "yesterday"), "since"), (("not-a-uuid",), "id")):
        refused = await streamsvc(env, tmp_path, "replay", *args)
        assert refused.returncode == 2 and f"streamsvc: {field}:" in refused.stderr, args


async def test_pause_and_resume_from_the_terminal_show_in_status(
    database: str, prefix: str, tmp_path: Path
) -> None:
    env = {**settings_env(database, prefix), "COLUMNS": "240"}
    paused = await streamsvc(env, tmp_path, "pause", "ORDER_CREATED")
    assert (paused.returncode, paused.stdout.strip()) == (
        0,
        "paused ORDER_CREATED (0 operations held)",
    )
    shown = await streamsvc(env, tmp_path, "status")
    assert re.search(r"ORDER_CREATED\s*│\s*0\s*│\s*cli:", shown.stdout), shown.stdout
    resumed = await streamsvc(env, tmp_path, "resume", "ORDER_CREATED")
    assert (resumed.returncode, resumed.stdout.strip()) == (
        0,
        "resumed ORDER_CREATED: 0 held operations released",
    )
    refused = await streamsvc(env, tmp_path, "pause", "")
    assert refused.returncode == 2 and "streamsvc: operationType:" in refused.stderr
