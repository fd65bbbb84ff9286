"""Scheduler: operations held for their runAt go on the work streams when they are due,
and each recurring operation (STREAMSVC_SCHEDULES) is submitted at each of its ticks.

Held operations live only in PostgreSQL (``wake_at``), so restarts and Redis data loss
lose none. Every ``poll_ms`` the scheduler takes those due within ``lookahead_ms`` (each
taken by one scheduler only, however many processes run), waits for each one's time by the
database's clock, and puts it on its priority band's work stream. A scheduler that stops
gives back what it held; one that dies leaves its taken operations looking like any stored
operation that never reached a stream, which the sweeper re-enqueues (after the sweep
interval: that late, never early, and once, since the flushers apply only pending rows
whose runAt has come).

A recurring operation's tick is submitted ``lookahead_ms`` ahead with runAt = the tick, under
an id derived from its name and the tick (streamsvc.schedules.tick_id), so every process
submits the same operation and the store keeps one. A tick missed while no process ran is
handled by streamsvc.schedules.due_on_start: the latest one runs once, on start.
"""

from __future__ import annotations

import datetime as dt
import heapq
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import structlog

from streamsvc import metrics
from streamsvc.adapters import streams as rs
from streamsvc.adapters.postgres import translate
from streamsvc.model import Operation, Receipt, Rejection, WorkOp
from streamsvc.schedules import Schedule, due_on_start, next_tick, tick_operation
from streamsvc.store import Store

log = structlog.get_logger("streamsvc.scheduler")

Submit = Callable[[Operation], Awaitable[Receipt | Rejection]]


class Scheduler:
    def __init__(
        self,
        store: Store,
        streams: rs.Streams,
        *,
        chunk: int,
        poll_ms: int = 200,
        lookahead_ms: int = 1000,
        page: int = 1000,
        schedules: Sequence[Schedule] = (),
        submit: Submit | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.chunk = chunk
        self.poll_s = poll_ms / 1000
        self.lookahead_s = lookahead_ms / 1000
        self.page = page
        self.schedules = list(schedules)
        self.submit = submit
        self.stopping = False
        self._held: list[tuple[float, int, WorkOp]] = []  # (monotonic time due, n, operation)
        self._n = 0
        self._wake = anyio.Event()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    def held_until(self, run_ats: Sequence[dt.datetime]) -> None:
        """Operations were just stored held for these times: look again now when one is
        due before the next look would find it."""
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.lookahead_s + self.poll_s)
        if any(run_at <= soon for run_at in run_ats):
            self._wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.schedules and self.submit is not None:
                tg.start_soon(self._recurring)
            try:
                await self._put_on_streams_when_due()
            finally:
                tg.cancel_scope.cancel()

    # -- held operations -----------------------------------------------------------------
    async def _put_on_streams_when_due(self) -> None:
        next_look = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_look or self._wake.is_set():
                    self._wake = anyio.Event()
                    await self._look()
                    next_look = time.monotonic() + self.poll_s
                await self._put_due(time.monotonic())
                nearest = self._held[0][0] if self._held else next_look
                with anyio.move_on_after(max(0.0, min(nearest, next_look) - time.monotonic())):
                    await self._wake.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._give_back()

    async def _look(self) -> None:
        """Take what comes due within the look-ahead."""
        try:
            due = await self.store.due(self.lookahead_s, self.page)
        except Exception as exc:
            log.warning(
                "schedule.look_failed",
                error=str(translate(exc)),
                next=f"looking again in {self.poll_s:.1f} s",
            )
            return
        taken_at = time.monotonic()
        for item in due:
            self._n += 1
            heapq.heappush(self._held, (taken_at + item.wait_s, self._n, item.work))

    async def _put_due(self, now: float) -> None:
        ready: list[WorkOp] = []
        while self._held and self._held[0][0] <= now:
            ready.append(heapq.heappop(self._held)[2])
        if ready and await self.streams.enqueue(
            ready, self.chunk, log=log, event="schedule.enqueue_failed"
        ):
            metrics.scheduled.inc(len(ready))

    async def _give_back(self) -> None:
        """Stopping: what was taken and not yet put on a stream waits for its time again."""
        ids = [work.id for _, _, work in self._held]
        self._held.clear()
        if not ids:
            return
        try:
            await self.store.hold_again(ids)
        except Exception as exc:
            log.warning(
                "schedule.give_back_failed",
                error=str(translate(exc)),
                operations=len(ids),
                next="the sweeper re-enqueues them from PostgreSQL",
            )

    # -- recurring operations --------------------------------------------------------------
    async def _recurring(self) -> None:
        now = dt.datetime.now(dt.UTC)
        last = await self._last_ticks()
        upcoming: list[tuple[dt.datetime, int, Schedule]] = []
        for n, schedule in enumerate(self.schedules):
            missed = due_on_start(schedule, last.get(schedule.name), now)
            if missed is not None:
                await self._submit_tick(schedule, missed)
            upcoming.append((next_tick(schedule, now), n, schedule))
        heapq.heapify(upcoming)
        while not self.stopping:
            tick, n, schedule = upcoming[0]
            ahead = (tick - dt.datetime.now(dt.UTC)).total_seconds() - self.lookahead_s
            if ahead > 0:
                await anyio.sleep(min(ahead, 60.0))  # a clock set back is seen within a minute
                continue
            await self._submit_tick(schedule, tick)
            heapq.heapreplace(upcoming, (next_tick(schedule, tick), n, schedule))

    async def _last_ticks(self) -> dict[str, dt.datetime]:
        while True:
            try:
                return await self.store.last_ticks()
            except Exception as exc:
                log.warning(
                    "schedule.ticks_unreadable",
                    error=str(translate(exc)),
                    next=f"reading again in {self.poll_s:.1f} s",
                )
                await anyio.sleep(self.poll_s)

    async def _submit_tick(self, schedule: Schedule, tick: dt.datetime) -> None:
        """Submit one tick until it is stored (or refused: the log says why), then record
        it. The same tick submitted twice (another process, a restart) is stored once."""
        assert self.submit is not None
        while True:
            try:
                result = await self.submit(tick_operation(schedule, tick))
                if isinstance(result, Rejection):
                    log.error(
                        "schedule.tick_refused",
                        schedule=schedule.name,
                        tick=tick.isoformat(),
                        error=result.message,
                        next="skipped; the next tick is tried",
                    )
                await self.store.record_tick(schedule.name, tick)
                return
            except Exception as exc:
                log.warning(
                    "schedule.tick_not_submitted",
                    schedule=schedule.name,
                    tick=tick.isoformat(),
                    error=str(translate(exc)),
                    next=f"trying again in {self.poll_s:.1f} s",
                )
                await anyio.sleep(self.poll_s)
