"""Gathering: a stage's small cycles spaced out while work keeps coming, never after a lull.

Each stage pays a fixed cost per cycle: its stream read and ack, its round trips and
commit, its publish. At full load a cycle carries hundreds of operations and that cost
vanishes; at a thousand operations a second, cycles run back to back with a handful each,
and the fixed cost is most of the bill. A ``Pacer`` lets the next cycle that is not full
start only ``gather`` after the previous one of its stage started, so that what arrives
meanwhile travels together. It never delays a cycle that follows a quiet moment (the
previous one started longer ago than ``gather``), nor a full one: a lone operation goes
at once, and a backlog at full speed.

The stages that gather are those no caller waits on: the inbox readers (a producer's XADD
has returned) and the flushers (the caller has its answer). Work gathers once: the intake
marks the work entries of what an inbox reader gathered (streamsvc.adapters.streams
``GATHERED``) and a flusher takes those at once. The notifier does not gather: a batch's
outcomes reach it as one entry. The group commits of HTTP and RPC requests gather with a
pacer of their own (STREAMSVC_INTAKE_GATHER_MS, a few milliseconds: a caller waits on it),
and only while two or more callers wait for theirs: a caller sending one request after the
other would otherwise wait for each answer (streamsvc.actors.ingress, docs/efficiency.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio


class Pacer:
    """The cycles of one stage in one process (its actors share it). An actor awaits
    ``gather`` before it reads its next work, and says ``started`` once it has some."""

    def __init__(self, gather_ms: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.gather_s = gather_ms / 1000
        self.clock = clock
        self._last = -math.inf
        self._full = False
        self._turn = anyio.Lock()

    @property
    def gathers(self) -> bool:
        """Whether this stage's cycles wait for company at all (a ``gather`` above 0)."""
        return self.gather_s > 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One actor of the stage at a time lets work gather and reads it (the others
        would only take the gathering work in smaller bites); their cycles still overlap.
        Without gathering, no turns: each actor takes work as it comes."""
        if not self.gather_s:
            yield
            return
        async with self._turn:
            yield

    def wait_s(self) -> float:
        """How long the next read should let work gather: until ``gather`` after the
        previous cycle started, unless that one was full; 0 once that is past (a quiet
        moment: the read then waits for the next work and hands it on at once)."""
        if self._full:
            return 0.0
        return max(0.0, self._last + self.gather_s - self.clock())

    async def gather(self) -> None:
        """Wait ``wait_s``."""
        wait = self.wait_s()
        if wait > 0:
            await anyio.sleep(wait)

    def started(self, *, full: bool) -> None:
        """A cycle starts now, with as much work as a cycle takes or work that gathered
        before (``full``: the next one need not wait), or less."""
        self._last = self.clock()
        self._full = full
