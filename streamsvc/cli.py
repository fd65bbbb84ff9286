"""``streamsvc``: run the service (or one role of it), or migrate its tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio
import asyncpg

from streamsvc import logs, settings
from streamsvc.adapters import postgres
from streamsvc.errors import ConfigError, NotMigratedError
from streamsvc.settings import Settings
from streamsvc.supervisor import ROLES, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="run every actor, or one role for scaling out")
    run_cmd.add_argument("--role", choices=ROLES, default="all")
    sub.add_parser("migrate", help="create or upgrade the service's own tables")
    return parser


async def _migrate(config: Settings) -> None:
    conn = await asyncpg.connect(**postgres.dsn_kwargs(config))
    try:
        applied = await postgres.migrate(conn)
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = settings.load()
        logs.configure(config.log_level)
        job: Callable[[], Awaitable[None]]
        if args.command == "migrate":

            async def job() -> None:
                await _migrate(config)
        else:

            async def job() -> None:
                await run(config, args.role)

        anyio.run(job, backend="asyncio", backend_options={"use_uvloop": True})
    except (ConfigError, NotMigratedError) as exc:
        print(f"streamsvc: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"streamsvc: cannot reach a server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
