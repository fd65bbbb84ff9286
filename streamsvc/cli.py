"""``streamsvc``: run the service (or one role of it), migrate its tables, manage API keys,
show where the work stands, list and replay operations, pause and resume an operationType."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import anyio
import asyncpg
import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table

from streamsvc import filters, logs, settings, status
from streamsvc.adapters import caller_role, postgres
from streamsvc.catalog import Catalog
from streamsvc.errors import ConfigError, InvalidOperation, NotMigratedError
from streamsvc.keys import KeyStore
from streamsvc.manage import Manager
from streamsvc.model import MAX_PAGE, CountQuery, ListQuery, Status, decode_error
from streamsvc.settings import Settings
from streamsvc.store import Selection
from streamsvc.store.postgres import PgStore
from streamsvc.store.records import REPLAYABLE
from streamsvc.supervisor import ROLES, run, streams_of


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="run every actor, or one role for scaling out")
    run_cmd.add_argument("--role", choices=ROLES, default="all")
    sub.add_parser(
        "migrate", help="create or upgrade the service's own tables and set up the caller role"
    )
    role = sub.add_parser(
        "caller-role",
        help="grant the role callers' statements run as what the allow-list needs, no more",
    )
    role.add_argument(
        "--sql", action="store_true", help="print the statements instead (for an administrator)"
    )
    status = sub.add_parser("status", help="stream depths, consumers, throughput, failures")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--every", type=float, default=2.0, help="seconds between refreshes")
    ops = sub.add_parser("ops", help="look at operations").add_subparsers(dest="ops", required=True)
    listing = ops.add_parser("list", help="operations, newest first (every caller's)")
    listing.add_argument("--status", choices=[s.value for s in Status])
    listing.add_argument("--type", dest="operation_type", help="an operationType")
    listing.add_argument("--since", help="created at or after (ISO 8601)")
    listing.add_argument("--until", help="created before (ISO 8601)")
    listing.add_argument("--limit", type=int, default=20, help=f"at most this many (1-{MAX_PAGE})")
    listing.add_argument("--cursor", help="where the previous page ended (its next cursor)")
    listing.add_argument("--json", action="store_true", help="print the page as JSON")
    counting = ops.add_parser(
        "counts", help="operations created in a window, by status and operationType"
    )
    counting.add_argument("--since", help="created at or after (ISO 8601; default: until - 1 day)")
    counting.add_argument("--until", help="created before (ISO 8601; default: now)")
    counting.add_argument("--json", action="store_true", help="print the counts as JSON")
    replay = sub.add_parser(
        "replay",
        help="make operations that ended FAIL or CANCELLED (dead-lettered ones are FAIL) "
        "pending again, under the same id",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="these operations")
    replay.add_argument("--type", dest="operation_type", help="of this operationType")
    replay.add_argument("--since", help="ended at or after (ISO 8601 with a time zone)")
    replay.add_argument("--until", help="ended before (ISO 8601 with a time zone)")
    replay.add_argument(
        "--status",
        action="append",
        choices=[s.value for s in REPLAYABLE],
        help="only those that ended so (repeat for both; default: both)",
    )
    replay.add_argument(
        "--all", action="store_true", help="every one that ended FAIL or CANCELLED (no filter)"
    )
    replay.add_argument("--dry-run", action="store_true", help="only count them")
    for verb, what in (("pause", "stored, not applied"), ("resume", "applied again, in order")):
        cmd = sub.add_parser(verb, help=f"{verb} an operationType: its operations are {what}")
        cmd.add_argument("operation_type", metavar="TYPE")
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--name", required=True)
    create.add_argument("--tables", help="comma list of tables (default: every allowed table)")
    create.add_argument(
        "--actions",
        default="insert,upsert,update,delete",
        help="comma list of insert, upsert, update, delete",
    )
    create.add_argument("--allow-sql", action="store_true", help="may send SQL statements")
    create.add_argument(
        "--admin", action="store_true", help="may see every caller's operations, not only its own"
    )
    create.add_argument(
        "--rate",
        type=int,
        metavar="N",
        help="most operations per second (default: STREAMSVC_RATE_LIMIT_OPS; 0: no limit)",
    )
    keys.add_parser("list", help="list keys (never the keys themselves)")
    revoke = keys.add_parser("revoke", help="revoke a key; every process refuses it in seconds")
    revoke.add_argument("name")
    return parser


async def _migrate(config: Settings) -> None:
    conn = await asyncpg.connect(**postgres.dsn_kwargs(config))
    try:
        applied = await postgres.migrate(conn)
        print("applied: " + ", ".join(applied) if applied else "database is up to date")
        await _sync_caller_role(conn, config)
    finally:
        await conn.close()


async def _caller_role(config: Settings, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(**postgres.dsn_kwargs(config))
    try:
        if not args.sql:
            await _sync_caller_role(conn, config)
            return
        for statement in await caller_role.plan(conn, config.caller_role, config.allow_list):
            print(f"{statement};")
    finally:
        await conn.close()


async def _sync_caller_role(conn: asyncpg.Connection, config: Settings) -> None:
    done = await caller_role.sync(conn, config.caller_role, config.allow_list)
    changes = f"{len(done)} change{'s' if len(done) != 1 else ''}" if done else "up to date"
    print(f"caller role {config.caller_role}: {changes}")


async def _keys(config: Settings, args: argparse.Namespace) -> None:
    settings.check_secret(config.api_key_secret, "required to create or check API keys")
    store = KeyStore(config.api_key_secret, config.allow_list)
    conn = await asyncpg.connect(**postgres.dsn_kwargs(config))
    try:
        await postgres.check_migrated(conn)
        if args.keys == "create":
            tables = _split(args.tables) if args.tables else None
            key = await store.create(
                conn,
                args.name,
                tables=tables,
                actions=_split(args.actions),
                allow_sql=args.allow_sql,
                admin=args.admin,
                rate_limit_ops=args.rate,
            )
            print(key)
        elif args.keys == "list":
            for info in await store.list(conn):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                scope = ",".join(info.tables) if info.tables is not None else "*"
                sql = " sql" if info.allow_sql else ""
                admin = " admin" if info.admin else ""
                rate = info.rate_limit_ops
                rate_text = "default" if rate is None else f"{rate}/s" if rate else "unlimited"
                print(
                    f"{info.name}\t{state}\ttables={scope}\tactions={','.join(info.actions)}"
                    f"{sql}{admin}\trate={rate_text}"
                )
        elif not await store.revoke(conn, args.name):
            raise InvalidOperation("name", f"no active key named {args.name!r}")
        else:
            print(f"revoked {args.name}")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _store(config: Settings) -> AsyncIterator[PgStore]:
    """The store of a migrated database, for one command."""
    pool = await asyncpg.create_pool(**postgres.dsn_kwargs(config), min_size=1, max_size=1)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await postgres.check_migrated(conn)
        yield PgStore(pool, Catalog(config.allow_list))
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _manager(config: Settings) -> AsyncIterator[Manager]:
    """The store and the work streams, for one command."""
    async with _store(config) as store:
        streams = streams_of(config)
        try:
            await streams.open()
            yield Manager(store, streams, chunk=config.batch_limit)
        finally:
            await streams.redis.aclose()


async def _status(config: Settings, args: argparse.Namespace) -> None:
    schedules = list(config.schedules.values())
    console = Console()
    async with _manager(config) as manage:
        store, streams = manage.store, manage.streams
        if not args.watch:
            console.print(status.render(await status.gather(store, streams, schedules=schedules)))
            return
        with Live(console=console, auto_refresh=False) as live:
            while True:
                snap = await status.gather(store, streams, schedules=schedules)
                live.update(status.render(snap), refresh=True)
                await anyio.sleep(args.every)


class _ReplayArgs(msgspec.Struct, forbid_unknown_fields=True):
    since: Annotated[dt.datetime, msgspec.Meta(tz=True)] | None = None
    until: Annotated[dt.datetime, msgspec.Meta(tz=True)] | None = None


async def _replay(config: Settings, args: argparse.Namespace) -> None:
    if not (args.ids or args.operation_type or args.since or args.until or args.all):
        raise InvalidOperation(
            "replay", "name the operations: IDs, --type, --since/--until, or --all for every one"
        )
    for op_id in args.ids:
        try:
            uuid.UUID(op_id)
        except ValueError:
            raise InvalidOperation("id", f"{op_id!r} is not a UUID") from None
    bounds = _converted({"since": args.since, "until": args.until}, _ReplayArgs)
    statuses = tuple(Status(s) for s in dict.fromkeys(args.status or [s.value for s in REPLAYABLE]))
    selection = Selection(
        statuses=statuses,
        operation_type=args.operation_type,
        since=bounds.since,
        until=bounds.until,
    )
    async with _manager(config) as manage:
        count = await manage.replay(selection, ids=args.ids, dry_run=args.dry_run)
    print(f"{'would replay' if args.dry_run else 'replayed'} {count} operations")


async def _pause(config: Settings, args: argparse.Namespace) -> None:
    async with _manager(config) as manage:
        if args.command == "pause":
            paused = await manage.pause(args.operation_type, by=f"cli:{getpass.getuser()}")
            print(f"paused {paused.operation_type} ({paused.held} operations held)")
        else:
            released = await manage.resume(args.operation_type)
            print(f"resumed {args.operation_type}: {released} held operations released")


async def _ops_list(config: Settings, args: argparse.Namespace) -> None:
    wanted = {
        "status": args.status,
        "operationType": args.operation_type,
        "since": args.since,
        "until": args.until,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    query = filters.list_query(_converted(wanted, ListQuery))
    async with _store(config) as store:
        page = await store.list_operations(query, owner=None)
    if args.json:
        print(msgspec.json.encode(page).decode())
        return
    table = Table("created", "id", "operationType", "status", "attempts", "error")
    for view in page.items:
        error = (view.error or "").splitlines()[0][:120] if view.error else ""
        stamp = view.created_at.strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(stamp, view.id, view.operation_type, view.status, str(view.attempts), error)
    console = Console()
    console.print(table)
    if page.next_cursor:
        console.print(f"more: --cursor {page.next_cursor}")


T = TypeVar("T")


def _converted(wanted: dict[str, Any], into: type[T]) -> T:
    """Command-line values as ``into``; InvalidOperation naming the field otherwise."""
    try:
        return msgspec.convert({k: v for k, v in wanted.items() if v is not None}, into)
    except msgspec.ValidationError as exc:
        refused = decode_error(exc)
        raise InvalidOperation(refused.field, refused.reason) from None


async def _ops_counts(config: Settings, args: argparse.Namespace) -> None:
    query = _converted({"since": args.since, "until": args.until}, CountQuery)
    since, until = filters.count_window(query, dt.datetime.now(dt.UTC))
    async with _store(config) as store:
        counts = await store.counts(since, until, owner=None)
    if args.json:
        print(msgspec.json.encode(counts).decode())
        return
    statuses = list(counts.by_status)
    table = Table(
        "operationType",
        *statuses,
        "total",
        title=f"created {since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC",
    )
    for op_type, by_status in sorted(counts.by_type.items()):
        row = [by_status.get(status, 0) for status in statuses]
        table.add_row(op_type, *map(str, row), str(sum(row)))
    total = [counts.by_status[status] for status in statuses]
    table.add_row("all", *map(str, total), str(sum(total)), style="bold")
    Console().print(table)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = settings.load()
        logs.configure(config.log_level)
        job: Callable[[], Awaitable[None]]
        if args.command == "migrate":

            async def job() -> None:
                await _migrate(config)
        elif args.command == "caller-role":

            async def job() -> None:
                await _caller_role(config, args)
        elif args.command == "keys":

            async def job() -> None:
                await _keys(config, args)
        elif args.command == "status":

            async def job() -> None:
                await _status(config, args)
        elif args.command == "ops":
            show = _ops_counts if args.ops == "counts" else _ops_list

            async def job() -> None:
                await show(config, args)
        elif args.command == "replay":

            async def job() -> None:
                await _replay(config, args)
        elif args.command in ("pause", "resume"):

            async def job() -> None:
                await _pause(config, args)
        else:

            async def job() -> None:
                await run(config, args.role)

        anyio.run(job, backend="asyncio", backend_options={"use_uvloop": True})
    except (ConfigError, NotMigratedError, InvalidOperation) as exc:
        print(f"streamsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"streamsvc: cannot reach a server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
