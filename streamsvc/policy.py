"""Pure decisions, no I/O: retry or give up, how long to wait, what to do with stuck work."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class Verdict(enum.Enum):
    RETRY = "retry"  # transient: try the same batch again after a pause
    FAIL = "fail"  # give up: the operations end as FAIL with the error
    LEAVE = "leave"  # stop trying here; the entry stays unacked for redelivery
    SPLIT = "split"  # apply the batch's halves apart, to find the operations at fault


@dataclass(frozen=True, slots=True)
class RetryDecision:
    verdict: Verdict
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped, for a bounded number of attempts."""

    max_attempts: int
    base_ms: int
    cap_ms: int

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Pause before attempt number ``attempt + 1`` (attempt counts from 1)."""
        ceiling = min(self.cap_ms, self.base_ms << min(attempt - 1, 30))
        jitter: float = (rng or random).uniform(0.5, 1.0)
        return ceiling * jitter / 1000

    def decide(
        self,
        *,
        transient: bool,
        attempt: int,
        stopping: bool = False,
        timeouts: int = 0,
        operations: int = 1,
        lock_waits: int = 0,
    ) -> RetryDecision:
        """After ``attempt`` failed tries: retry transient errors until the budget is spent.

        ``lock_waits``: when this failure is a lock wait that ran out (another transaction
        held a table or row the batch needs), how many the batch has met in a row. Not the
        operations' fault: retried with a backoff that grows with ``lock_waits``, whatever
        ``attempt`` is (the caller does not count these toward it), never split, never
        failed.

        ``timeouts``: when this failure is a statement timeout, how many the batch has met
        (this one included, and those of the batch it was cut from). The first is retried
        like any transient error (a lock may be gone by then); after that, or when the
        budget is spent, the batch of ``operations`` is split, so that a slow operation
        ends up alone and fails, and the others apply.

        While the process is stopping a transient failure is not retried here; the batch
        stays unacked and the sweeper hands it to another flusher later."""
        if not transient:
            return RetryDecision(Verdict.FAIL)
        if lock_waits:
            if stopping:
                return RetryDecision(Verdict.LEAVE)
            return RetryDecision(Verdict.RETRY, self.backoff_s(lock_waits))
        if timeouts >= 2 or (timeouts and attempt >= self.max_attempts):
            if stopping:
                return RetryDecision(Verdict.LEAVE)
            return RetryDecision(Verdict.SPLIT if operations > 1 else Verdict.FAIL)
        if attempt >= self.max_attempts:
            return RetryDecision(Verdict.FAIL)
        if stopping:
            return RetryDecision(Verdict.LEAVE)
        return RetryDecision(Verdict.RETRY, self.backoff_s(attempt))


def halves(count: int) -> tuple[int, int]:
    """Split sizes for bisecting a failed group of ``count`` operations."""
    first = count // 2
    return first, count - first


class StuckAction(enum.Enum):
    REENQUEUE = "reenqueue"  # put it back on the stream as it is
    SPLIT = "split"  # put it back as two entries, to corner a poison operation
    DEAD_LETTER = "dead_letter"  # give up on it: dead-letter stream and FAIL


def stuck_entry(*, operations: int, deliveries: int, max_deliveries: int) -> StuckAction:
    """What the sweeper does with an entry nobody acked for too long.

    ``deliveries`` counts every time the entry (or the one it was split from) was handed
    to a flusher. An entry holding several operations is split rather than given up, so a
    single operation that keeps killing its flusher ends up alone and only it is
    dead-lettered."""
    if deliveries < 2:
        return StuckAction.REENQUEUE
    if operations > 1:
        return StuckAction.SPLIT
    if deliveries >= max_deliveries:
        return StuckAction.DEAD_LETTER
    return StuckAction.REENQUEUE


class BandTurns:
    """Which priority band a flusher serves first, turn by turn: weighted turns between
    the bands, no starvation.

    Band ``p`` (0-9) has weight ``p + 1``; each turn leads with the band that smooth
    weighted round robin picks (every 55 turns: band 9 leads 10 times, band 0 once, spread
    evenly), then the other bands from 9 down. A turn takes entries from the leading band
    first and fills up from the next ones, so while higher bands have work they go first
    in most turns, and a band with waiting work is served first in at least (p + 1) / 55 of
    all turns however much waits above it. Pure."""

    WEIGHTS = tuple((p, p + 1) for p in range(9, -1, -1))
    TOTAL = sum(w for _, w in WEIGHTS)

    def __init__(self) -> None:
        self._current = dict.fromkeys(range(10), 0)

    def next(self) -> list[int]:
        for band, weight in self.WEIGHTS:
            self._current[band] += weight
        lead = max(self._current, key=lambda b: (self._current[b], b))
        self._current[lead] -= self.TOTAL
        return [lead, *(p for p, _ in self.WEIGHTS if p != lead)]
