"""The `streamsvc` command: migrate, start-up refusals, one-line setting errors."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import PG, settings_env

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def streamsvc(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamsvc", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    first = streamsvc(env, tmp_path, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied: 001_batch_operations.sql" in first.stdout
    again = streamsvc(env, tmp_path, "migrate")
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
    assert tables == {"BatchOperations", "streamsvc_migrations"}


async def test_run_refuses_an_unmigrated_database(empty_database: str, tmp_path: Path) -> None:
    result = streamsvc(settings_env(empty_database, "unused"), tmp_path, "run")
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
def test_a_bad_setting_stops_start_up_with_one_line(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    result = streamsvc({variable: value}, tmp_path, "run")
    assert result.returncode == 2
    assert result.stderr.strip() == message


def test_settings_come_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DB_PORT=notaport\n")
    result = streamsvc({}, tmp_path, "migrate")
    assert result.returncode == 2
    assert "DB_PORT" in result.stderr
