"""API keys: who may submit what. Keys are shown once, stored only as HMAC-SHA256.

Every process keeps the active keys in memory (hash -> Caller) and reloads them every
``refresh_s``, so a revoked key is refused everywhere within seconds without a database
round trip per request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import asyncpg
import structlog

from streamsvc.allowlist import AllowList
from streamsvc.errors import InvalidOperation
from streamsvc.ratelimit import RateLimiter, Refusal
from streamsvc.validate import ALL_ACTIONS, ANONYMOUS, Caller

log = structlog.get_logger("streamsvc.keys")

KEY_PREFIX = "ssk_"

ACTIVE_KEYS = """
SELECT name, key_hash, tables, actions, allow_sql, admin, rate_limit_ops FROM streamsvc_api_keys
WHERE revoked_at IS NULL
"""
CREATE_KEY = """
INSERT INTO streamsvc_api_keys (name, key_hash, tables, actions, allow_sql, admin, rate_limit_ops)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
LIST_KEYS = """
SELECT name, tables, actions, allow_sql, admin, rate_limit_ops, created_at, revoked_at
FROM streamsvc_api_keys ORDER BY name
"""
REVOKE_KEY = """
UPDATE streamsvc_api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL
"""


class Authenticator:
    """The one place every ingress path asks who a caller is, and whether it may send this
    many operations now. With STREAMSVC_AUTH=off every caller is ``anonymous`` with full
    scope (and one shared rate limit, the service default)."""

    def __init__(self, store: KeyStore | None, limiter: RateLimiter | None = None) -> None:
        self.store = store
        self.limiter = limiter

    async def admit(self, caller: Caller, count: int) -> Refusal | None:
        """None when ``caller`` may submit ``count`` operations now (see ratelimit)."""
        if self.limiter is None:
            return None
        return await self.limiter.admit(caller, count)

    async def admit_some(self, caller: Caller, count: int) -> tuple[int, Refusal | None]:
        """How many of ``count`` operations, in order, ``caller`` may submit now."""
        if self.limiter is None:
            return count, None
        return await self.limiter.admit_some(caller, count)

    def caller_for(self, key: str | bytes | None) -> Caller:
        if self.store is None:
            return ANONYMOUS
        if isinstance(key, bytes):
            key = key.decode(errors="replace")
        return self.store.authenticate(key)


def digest(secret: str, key: str) -> bytes:
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    name: str
    tables: list[str] | None
    actions: list[str]
    allow_sql: bool
    admin: bool
    rate_limit_ops: int | None  # None: the service default (STREAMSVC_RATE_LIMIT_OPS)
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class KeyStore:
    def __init__(self, secret: str, allow: AllowList, *, refresh_s: float = 2.0) -> None:
        self.secret = secret
        self.allow = allow
        self.refresh_s = refresh_s
        self._callers: dict[bytes, Caller] = {}

    # -- checking ------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> Caller:
        """The caller a key belongs to; InvalidOperation on field ``key`` otherwise."""
        if not key:
            raise InvalidOperation("key", "an API key is required")
        computed = digest(self.secret, key)
        found: Caller | None = None
        for stored, caller in self._callers.items():  # every one, without an early exit
            if hmac.compare_digest(stored, computed):
                found = caller
        if found is None:
            raise InvalidOperation("key", "unknown or revoked API key")
        return found

    async def load(self, conn: asyncpg.Connection) -> None:
        callers = {}
        for row in await conn.fetch(ACTIVE_KEYS):
            refs = None
            if row["tables"] is not None:
                resolved = (self.allow.resolve(t) for t in row["tables"])
                refs = frozenset(r for r in resolved if r)
            callers[bytes(row["key_hash"])] = Caller(
                row["name"],
                refs,
                frozenset(row["actions"]),
                row["allow_sql"],
                admin=row["admin"],
                rate_limit_ops=row["rate_limit_ops"],
            )
        self._callers = callers

    async def run(self, pool: asyncpg.Pool) -> None:
        """Reload the active keys every ``refresh_s``; a failed reload keeps the old set."""
        while True:
            await anyio.sleep(self.refresh_s)
            try:
                async with pool.acquire() as conn:
                    await self.load(conn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning(
                    "keys.reload_failed",
                    error=str(exc),
                    next=f"keeping the loaded keys, trying again in {self.refresh_s} s",
                )

    # -- managing ------------------------------------------------------------------------
    async def create(
        self,
        conn: asyncpg.Connection,
        name: str,
        *,
        tables: Sequence[str] | None,
        actions: Sequence[str],
        allow_sql: bool,
        admin: bool = False,
        rate_limit_ops: int | None = None,
    ) -> str:
        """Store a new key and return it: the only time it is ever shown.

        ``admin`` lets it see every caller's operations; ``rate_limit_ops`` caps its
        operations per second (None: the service default, 0: no limit)."""
        if not name or name == ANONYMOUS.name:
            raise InvalidOperation("name", f"{name!r} cannot name a key")
        if rate_limit_ops is not None and rate_limit_ops < 0:
            raise InvalidOperation("rate", "operations per second cannot be negative")
        unknown = sorted(set(actions) - ALL_ACTIONS)
        if unknown:
            raise InvalidOperation("actions", f"unknown action {unknown[0]!r}")
        not_allowed = [t for t in tables or () if self.allow.resolve(t) is None]
        if not_allowed:
            raise InvalidOperation(
                "tables", f"{not_allowed[0]!r} is not in STREAMSVC_ALLOWED_TABLES"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            await conn.execute(
                CREATE_KEY,
                name,
                digest(self.secret, key),
                list(tables) if tables is not None else None,
                sorted(actions),
                allow_sql,
                admin,
                rate_limit_ops,
            )
        except asyncpg.UniqueViolationError:
            raise InvalidOperation("name", f"a key named {name!r} exists already") from None
        return key

    @staticmethod
    async def list(conn: asyncpg.Connection) -> list[KeyInfo]:
        return [KeyInfo(*row) for row in await conn.fetch(LIST_KEYS)]

    @staticmethod
    async def revoke(conn: asyncpg.Connection, name: str) -> bool:
        return bool(await conn.execute(REVOKE_KEY, name) == "UPDATE 1")
