"""The loop of the actors that work in cycles (the sweeper, retention): a cycle every
interval, its report logged when it did something, a failure logged and tried again next
time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import anyio

from streamsvc.adapters.postgres import translate


async def every(
    interval_ms: int, cycle: Callable[[], Awaitable[Any]], *, log: Any, event: str
) -> None:
    """Run ``cycle`` every ``interval_ms`` for ever. Its report (a dataclass) is logged as
    ``<event>.done`` unless it equals a fresh one (nothing happened); an exception is
    logged as ``<event>.failed``, and the next cycle comes as usual."""
    while True:
        try:
            report = await cycle()
            if report != type(report)():
                log.info(f"{event}.done", **asdict(report))
        except Exception as exc:
            log.warning(
                f"{event}.failed",
                error=str(translate(exc)),
                next=f"trying again in {interval_ms / 1000:.1f} s",
            )
        await anyio.sleep(interval_ms / 1000)
