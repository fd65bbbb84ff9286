"""Waiting out a failing server: say what happens next, then pause."""

from __future__ import annotations

from typing import Any

import anyio

from streamsvc.policy import RetryPolicy


async def pause(
    log: Any,
    event: str,
    error: object,
    retry: RetryPolicy,
    failures: int,
    then: str,
) -> None:
    """Log ``event`` with the error and "<then> in N s", and sleep that long."""
    delay = retry.backoff_s(failures)
    log.warning(event, error=str(error), next=f"{then} in {delay:.1f} s")
    await anyio.sleep(delay)
