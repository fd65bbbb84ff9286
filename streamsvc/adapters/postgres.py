"""PostgreSQL: the pool, the migrations, and which driver errors are worth retrying."""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import asyncpg
import msgspec

from streamsvc.adapters import caller_role
from streamsvc.errors import NotMigratedError, PermanentError, StreamsvcError, TransientError
from streamsvc.settings import Settings

# SQLSTATE classes worth a retry: connection exception, transaction rollback (serialization
# failure, deadlock), insufficient resources, operator intervention (shutdown, statement
# timeout via query_canceled: see StatementTimeout), system error; plus lock_not_available.
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
TRANSIENT_SQLSTATES = ("55P03",)
CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    # The driver's own state, not the statement's: seen when the server terminated the
    # connection mid-transaction ("cannot switch to state 15; another operation (2) is in
    # progress"). Tried again on another connection, never the operations' fault.
    asyncpg.exceptions.InternalClientError,
)

MIGRATIONS_TABLE = "streamsvc_migrations"
_MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x5354524D  # advisory lock serialising concurrent `streamsvc migrate`
QUERY_CANCELED = "57014"  # statement_timeout, or a cancel request
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout, or a wait the flush functions ended as one


class StatementTimeout(TransientError):
    """A statement ran past STREAMSVC_STATEMENT_TIMEOUT_MS, or an operator cancelled it
    (pg_cancel_backend: the same SQLSTATE, told apart only by a translatable message, and
    taken the same way: as a judgement that it ran too long). Retried once with its
    batch; after that the batch is cut until the slow operation stands alone
    (streamsvc.policy). A timeout or cancel that hit while the batch only waited for its
    table locks or its rows is a LockWait instead (sql/apply_rows.sql, sql/batch.sql)."""


class LockWait(TransientError):
    """A wait for a lock ran out (lock_timeout, STREAMSVC_LOCK_TIMEOUT_MS): someone else
    holds a table or row the batch needs. Not the operations' fault: retried with backoff
    until the lock is free, never counted toward STREAMSVC_MAX_ATTEMPTS, never split."""


def is_transient(sqlstate: str) -> bool:
    return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES


def translate(exc: BaseException) -> StreamsvcError:
    """The project's error for a driver exception: transient or permanent."""
    if isinstance(exc, StreamsvcError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        message = str(exc)  # asyncpg's text carries the DETAIL and HINT lines too
        if state == QUERY_CANCELED:
            return StatementTimeout(f"statement timeout: {message}")
        if state == LOCK_NOT_AVAILABLE:
            return LockWait(f"lock wait: {message}")
        if is_transient(state):
            return TransientError(message)
        return PermanentError(message)
    if isinstance(exc, asyncpg.exceptions.DataError):  # bad parameter, caught client-side
        return PermanentError(str(exc))
    if isinstance(exc, CONNECTION_EXCEPTIONS):
        return TransientError(f"{type(exc).__name__}: {exc}")
    return PermanentError(f"{type(exc).__name__}: {exc}")


def dsn_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.db_host,
        "port": settings.db_port,
        "user": settings.db_user,
        "password": settings.db_password or None,
        "database": settings.db_name,
    }


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Only end a transaction left open. asyncpg's default reset (unlock advisory locks,
    CLOSE ALL, UNLISTEN *, RESET ALL) costs a round trip per release, and the service leaves
    none of that behind: it takes transaction-level locks only. What callers' statements
    can leave (settings changed for the session, session advisory locks) the flusher
    cleans after each batch that ran them (queries.CLEAN_SESSION, which also drops a
    statement the caller role's function prepared and a timeout kept it from dropping);
    they can open no cursor, LISTEN or prepare anything themselves, running as one INSERT,
    UPDATE or DELETE each."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


_FLUSH_FUNCTIONS = "\n".join(
    resources.files("streamsvc.sql").joinpath(name).read_text()
    for name in ("apply_rows.sql", "batch.sql")
)


async def create_flush_functions(conn: asyncpg.Connection) -> None:
    """The functions a batch transaction calls, in the connection's pg_temp: isolating
    refused rows (sql/apply_rows.sql) and the batch's bookkeeping (sql/batch.sql)."""
    await conn.execute(_FLUSH_FUNCTIONS)


async def init_connection(
    conn: asyncpg.Connection, *, flushing: bool = True, caller: str = caller_role.DEFAULT
) -> None:
    """JSON values bound natively; for a process that flushes, the functions of a batch
    transaction in the connection's pg_temp too (``create_flush_functions``), the one
    callers' statements run in handed to the role ``caller`` (streamsvc.adapters.caller_role)."""
    if flushing:
        await create_flush_functions(conn)
        await conn.execute(caller_role.hand_over_sql(caller))
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            schema="pg_catalog",
            encoder=lambda value: msgspec.json.encode(value).decode(),
            decoder=msgspec.json.decode,
        )


async def create_pool(
    settings: Settings, *, size: int | None = None, flushing: bool = True
) -> asyncpg.Pool:
    """A pool whose connections bind JSON values natively and time out stuck statements and
    lock waits (``Settings.lock_wait_ms``, below the statement timeout);
    ``flushing``: the process runs flushers (see ``init_connection``), and the caller role
    is first checked and, when the allow-list changed, set up again (``caller_role.sync``)."""
    if flushing:
        conn = await asyncpg.connect(**dsn_kwargs(settings))
        try:
            await check_migrated(conn)
            await caller_role.sync(conn, settings.caller_role, settings.allow_list)
        finally:
            await conn.close()
    server_settings = {"application_name": "streamsvc"}
    if settings.statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
    if settings.lock_wait_ms:
        server_settings["lock_timeout"] = str(settings.lock_wait_ms)
    pool = await asyncpg.create_pool(
        **dsn_kwargs(settings),
        min_size=1,
        max_size=size or settings.db_pool_size,
        init=functools.partial(init_connection, flushing=flushing, caller=settings.caller_role),
        reset=_reset_connection,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("streamsvc.sql").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match[1]), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in await conn.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)",
                    version,
                    name,
                )
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def check_migrated(conn: asyncpg.Connection) -> None:
    """Raise NotMigratedError unless every shipped migration has been applied."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", MIGRATIONS_TABLE)
    done = set()
    if exists:
        done = {r[0] for r in await conn.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")}
    missing = [name for version, name, _ in migrations() if version not in done]
    if missing:
        raise NotMigratedError(
            f"database is not migrated ({len(missing)} pending: {', '.join(missing)}); "
            "run `streamsvc migrate` first"
        )
