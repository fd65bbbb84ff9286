"""Heartbeat: each process says it is alive, so that the work its flushers took is taken
over within seconds of its death instead of after STREAMSVC_CLAIM_IDLE_MS.

Every ``every_ms`` the process sets its key (``<prefix>:alive:<process>``) to expire after
``TTL_BEATS`` beats. Its consumers are named ``<process>/<actor>`` (``rs.consumer_name``),
so the others can tell whose they are: a consumer whose process's key has expired belongs to
a process that died (or stopped answering Redis for that long), and its entries are taken
over at once (``rs.Streams.dead_consumers``): work entries by the sweeper
(``Sweeper.take_over``), inbox entries by the live inbox readers, outcome entries by the live
notifiers. A live process keeps its key however slow its batches: the beat is a
task of its own. A process that stops cleanly removes its key as it goes.
"""

from __future__ import annotations

import os
import secrets
import socket

import anyio
import redis.asyncio as aioredis
import structlog

from streamsvc.adapters import streams as rs

log = structlog.get_logger("streamsvc.heartbeat")

TTL_BEATS = 3  # a key outlives two missed beats


def abandoned_after_ms(every_ms: int) -> int:
    """How long a dead process's entries have been idle, at least, once its key expired: it
    beat last TTL_BEATS beats before, and died within the beat after. Claiming with this
    minimum also leaves alone an entry another live consumer has just claimed."""
    return every_ms * (TTL_BEATS - 1)


def process_name() -> str:
    """This process's name: host and pid, and a few random bytes, because a restarted
    container's process has the same host name and pid as the one that died."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Heartbeat:
    def __init__(self, redis: aioredis.Redis, names: rs.Names, process: str, *, every_ms: int):
        self.redis = redis
        self.key = names.alive(process)
        self.every_ms = every_ms

    @property
    def ttl_ms(self) -> int:
        return self.every_ms * TTL_BEATS

    async def beat(self) -> None:
        await self.redis.set(self.key, b"1", px=self.ttl_ms)

    async def run(self) -> None:
        """Beat until cancelled; a beat Redis did not take is logged, and the next one tries
        again (two missed beats and the process counts as dead)."""
        while True:
            try:
                await self.beat()
            except rs.NOT_TAKEN as exc:
                log.warning("heartbeat.failed", error=str(exc), next="beating again")
            await anyio.sleep(self.every_ms / 1000)

    async def stop(self) -> None:
        """A clean stop: the process is gone at once (its consumers hold nothing by now)."""
        try:
            await self.redis.delete(self.key)
        except rs.NOT_TAKEN as exc:
            log.warning(
                "heartbeat.not_removed", error=str(exc), next=f"expires in {self.ttl_ms} ms"
            )
