import random

import pytest

from streamsvc.policy import RetryDecision, RetryPolicy, StuckAction, Verdict, halves, stuck_entry

POLICY = RetryPolicy(max_attempts=3, base_ms=100, cap_ms=1000)


@pytest.mark.parametrize(
    ("transient", "attempt", "stopping", "verdict"),
    [
        (True, 1, False, Verdict.RETRY),
        (True, 2, False, Verdict.RETRY),
        (True, 3, False, Verdict.FAIL),  # budget spent
        (False, 1, False, Verdict.FAIL),  # permanent: no retry
        (True, 1, True, Verdict.LEAVE),  # stopping: leave it for redelivery
        (False, 1, True, Verdict.FAIL),
    ],
)
def test_retry_decisions(transient: bool, attempt: int, stopping: bool, verdict: Verdict) -> None:
    decision = POLICY.decide(transient=transient, attempt=attempt, stopping=stopping)
    assert decision.verdict is verdict
    assert (decision.delay_s > 0) == (verdict is Verdict.RETRY)


def transient(
    attempt: int, stopping: bool, *, operations: int = 100, **counts: int
) -> RetryDecision:
    """The policy's decision on a transient error of a batch of ``operations``."""
    return POLICY.decide(
        transient=True, attempt=attempt, stopping=stopping, operations=operations, **counts
    )


@pytest.mark.parametrize(
    ("attempt", "timeouts", "operations", "stopping", "verdict"),
    [
        (1, 1, 100, False, Verdict.RETRY),  # the first timeout: once more, as it is
        (2, 2, 100, False, Verdict.SPLIT),  # again: cut the batch to find the slow one
        (2, 2, 1, False, Verdict.FAIL),  # alone: it fails
        (1, 3, 50, False, Verdict.SPLIT),  # a half of a timed-out batch: cut at once
        (1, 3, 1, False, Verdict.FAIL),
        (3, 1, 100, False, Verdict.SPLIT),  # budget spent on other errors: no retry left
        (2, 2, 100, True, Verdict.LEAVE),  # stopping: leave it for redelivery
    ],
)
def test_statement_timeout_decisions(
    attempt: int, timeouts: int, operations: int, stopping: bool, verdict: Verdict
) -> None:
    decision = transient(attempt, stopping, timeouts=timeouts, operations=operations)
    assert decision.verdict is verdict


@pytest.mark.parametrize(
    ("attempt", "lock_waits", "timeouts", "stopping", "verdict"),
    [
        (0, 1, 0, False, Verdict.RETRY),  # another transaction holds the lock: wait again
        (0, 50, 0, False, Verdict.RETRY),  # however long it holds it: never FAIL
        (3, 1, 0, False, Verdict.RETRY),  # budget spent on other errors: still not a FAIL
        (1, 1, 2, False, Verdict.RETRY),  # timeouts met before do not cut a waiting batch
        (0, 1, 0, True, Verdict.LEAVE),  # stopping: leave it for redelivery
    ],
)
def test_lock_wait_decisions(
    attempt: int, lock_waits: int, timeouts: int, stopping: bool, verdict: Verdict
) -> None:
    decision = transient(attempt, stopping, timeouts=timeouts, lock_waits=lock_waits)
    assert decision.verdict is verdict
    assert (decision.delay_s > 0) == (verdict is Verdict.RETRY)


@pytest.mark.parametrize(("lock_waits", "ceiling_s"), [(1, 0.1), (3, 0.4), (20, 1.0)])
def test_lock_waits_back_off_like_attempts(lock_waits: int, ceiling_s: float) -> None:
    delay = POLICY.decide(transient=True, attempt=0, lock_waits=lock_waits).delay_s
    assert ceiling_s / 2 - 1e-9 <= delay <= ceiling_s + 1e-9


@pytest.mark.parametrize(
    ("attempt", "ceiling_s"), [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (9, 1.0)]
)
def test_backoff_grows_exponentially_up_to_the_cap(attempt: int, ceiling_s: float) -> None:
    rng = random.Random(1)
    delays = [POLICY.backoff_s(attempt, rng) for _ in range(200)]
    assert max(delays) <= ceiling_s + 1e-9
    assert min(delays) >= ceiling_s / 2 - 1e-9


@pytest.mark.parametrize(
    ("count", "expected"), [(1, (0, 1)), (2, (1, 1)), (7, (3, 4)), (1000, (500, 500))]
)
def test_halves(count: int, expected: tuple[int, int]) -> None:
    assert halves(count) == expected


@pytest.mark.parametrize(
    ("operations", "deliveries", "action"),
    [
        (100, 1, StuckAction.REENQUEUE),  # first time stuck: maybe just a dead consumer
        (100, 2, StuckAction.SPLIT),  # came back again: corner the culprit
        (1, 2, StuckAction.REENQUEUE),
        (1, 4, StuckAction.REENQUEUE),
        (1, 5, StuckAction.DEAD_LETTER),
        (2, 9, StuckAction.SPLIT),  # never dead-letter innocent neighbours
    ],
)
def test_stuck_entries(operations: int, deliveries: int, action: StuckAction) -> None:
    assert stuck_entry(operations=operations, deliveries=deliveries, max_deliveries=5) is action
