"""Fairness: each key submits at most its rate of operations per second, across processes.

A key's limit is its own (``streamsvc keys create --rate N``) or the service default
(STREAMSVC_RATE_LIMIT_OPS); 0 is no limit. The counters live in Redis, so every process
of a deployment counts against the same budget: a key cannot multiply its rate by
spreading requests over processes. The `limits` library's sliding-window counter costs one
Redis round trip (one Lua script) per request, whatever its size, and counts only what it
admits: a refused request takes nothing of the budget. A bulk request counts its
operations, and is admitted or refused whole.

When Redis does not answer within ``timeout_s`` the request is admitted and a warning
logged: the limit protects other callers' share, and refusing everyone while Redis is away
would be the outage it is meant to prevent (ingress keeps storing to PostgreSQL then).
"""

from __future__ import annotations

import math
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import anyio
import redis.exceptions
import structlog
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from streamsvc.validate import Caller

log = structlog.get_logger("streamsvc.ratelimit")

UNAVAILABLE: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused, and when to come back (None: never as it is: it alone
    holds more operations than a second allows)."""

    caller: str
    limit: int
    asked: int
    retry_after_s: int | None

    @property
    def reason(self) -> str:
        head = f"key {self.caller!r} may submit {self.limit} operations per second"
        if self.retry_after_s is None:
            return f"{head}; {self.asked} in one request is more: send fewer at a time"
        return f"{head}; over the limit, retry in {self.retry_after_s} s"


class RateLimiter:
    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        default_ops: int,
        timeout_s: float = 1.0,
        cluster_url: str | None = None,
    ):
        """``client``: the process's redis.asyncio client, whose connections it shares; in
        cluster mode (``cluster_url``, a node's REDIS_URL) the library keeps a cluster
        client of its own, and puts each key's two windows under one hash tag."""
        storage: RedisStorage
        if cluster_url is None:
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                key_prefix=f"{prefix}:rate",
                connection_pool=client.connection_pool,
            )
        else:
            storage = RedisClusterStorage(
                _cluster_uri(cluster_url),
                implementation="redispy",
                key_prefix=f"{prefix}:rate",
                ssl=cluster_url.startswith("rediss:"),
            )
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._own = storage if cluster_url is not None else None
        self.default_ops = default_ops
        self.timeout_s = timeout_s
        self._items: dict[int, RateLimitItem] = {}

    def limit_of(self, caller: Caller) -> int:
        """Operations per second ``caller`` may submit; 0: no limit."""
        return self.default_ops if caller.rate_limit_ops is None else caller.rate_limit_ops

    async def admit(self, caller: Caller, count: int) -> Refusal | None:
        """Take ``count`` operations from the caller's budget: None when admitted."""
        limit = self.limit_of(caller)
        if limit == 0 or count == 0:
            return None
        if count > limit:
            return Refusal(caller.name, limit, count, None)
        item = self._item(limit)
        try:
            with anyio.fail_after(self.timeout_s):
                if await self._limiter.hit(item, caller.name, cost=count):
                    return None
                stats = await self._limiter.get_window_stats(item, caller.name)
        except UNAVAILABLE as exc:
            _admitted_blind(caller, exc)
            return None
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        return Refusal(caller.name, limit, count, retry)

    async def admit_some(self, caller: Caller, count: int) -> tuple[int, Refusal | None]:
        """For the inbox, whose entries are separate requests: how many of ``count``
        operations (taken in order) are admitted, and why the rest are not."""
        refusal = await self.admit(caller, count)
        if refusal is None:
            return count, None
        item = self._item(refusal.limit)
        try:
            with anyio.fail_after(self.timeout_s):
                stats = await self._limiter.get_window_stats(item, caller.name)
                some = min(stats.remaining, count - 1)
                if some and not await self._limiter.hit(item, caller.name, cost=some):
                    some = 0
        except UNAVAILABLE as exc:
            _admitted_blind(caller, exc)
            return count, None
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        return some, Refusal(caller.name, refusal.limit, count - some, retry)

    async def aclose(self) -> None:
        """Close the cluster client the library made (``limits`` has no call for it: its
        redis-py bridge keeps the client as ``storage``)."""
        client = getattr(getattr(self._own, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()

    def _item(self, limit: int) -> RateLimitItem:
        item = self._items.get(limit)
        if item is None:
            item = self._items[limit] = RateLimitItemPerSecond(limit, 1, namespace="ops")
        return item


def _admitted_blind(caller: Caller, exc: BaseException) -> None:
    log.warning(
        "rate.unavailable",
        caller=caller.name,
        error=str(exc) or type(exc).__name__,
        next="admitted without counting until Redis answers",
    )


def _cluster_uri(url: str) -> str:
    """A REDIS_URL (``redis://[user:password@]host:port/db``) as `limits` names a cluster
    node: ``async+redis+cluster://[user:password@]host:port``."""
    netloc = urllib.parse.urlsplit(url).netloc
    return f"async+redis+cluster://{netloc}"
