"""Helpers that drive a Service in-process: start its committers, drain its flushers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import msgspec

from streamsvc.model import Operation
from streamsvc.supervisor import Service, open_service
from streamsvc.settings import Settings


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """A service whose ingress committers run in the background."""
    async with open_service(settings) as service, anyio.create_task_group() as tg:
        tg.start_soon(service.ingress.run)
        try:
            yield service
        finally:
            tg.cancel_scope.cancel()


async def drain(service: Service) -> None:
    """Run every flusher until the work stream has nothing left for them."""
    async with anyio.create_task_group() as tg:
        for flusher in service.flushers:
            tg.start_soon(lambda f=flusher: f.run(burst=True))


def ops(raw: list[dict[str, object]]) -> list[Operation]:
    return msgspec.convert(raw, list[Operation])


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, every: float = 0.05
) -> None:
    """Wait until ``check()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await anyio.sleep(every)
