import time

import anyio
import pytest

from benchmarks.latency import offer, stages
from benchmarks.scenarios import Ingress, Op
from benchmarks.stage import cpu_share, steal_percent

pytestmark = pytest.mark.anyio


class Recorder:
    """An ingress that takes ``delay_s`` to answer and records what it was sent."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.requests: list[list[Op]] = []

    async def request(self, ops: list[Op]) -> None:
        self.requests.append(ops)
        await anyio.sleep(self.delay_s)


def _ops(n: int) -> list[Op]:
    return [{"userOperationId": f"op-{i}"} for i in range(n)]


async def test_every_operation_goes_once_in_order_at_the_offered_rate() -> None:
    recorder = Recorder(delay_s=0)
    ops = _ops(400)
    started = time.perf_counter()
    submitted = await offer(Ingress("inbox", 1000, 1, recorder.request, coalesce=True), ops, 2000)
    elapsed = time.perf_counter() - started
    sent = [op for request in recorder.requests for op in request]
    assert sent == ops
    assert list(submitted) == [op["userOperationId"] for op in ops]
    assert 0.19 <= elapsed < 0.5  # 400 at 2,000 a second: the last is due at 0.2 s
    # one wake per 5 ms tick at most, so requests carry several operations each
    assert len(recorder.requests) <= 0.2 / 0.005 + 2


async def test_a_slow_answer_delays_no_later_submission() -> None:
    recorder = Recorder(delay_s=0.3)  # every answer takes longer than the whole schedule
    ops = _ops(20)
    answered: dict[str, float] = {}
    submitted = await offer(Ingress("rpc", 1, 64, recorder.request), ops, 200, answered=answered)
    times = [submitted[op["userOperationId"]] for op in ops]
    assert times[-1] - times[0] < 0.2  # sent on schedule (0.1 s), not one answer after another
    assert len(recorder.requests) == 20
    waits = [answered[i] - submitted[i] for i in submitted]
    assert all(0.29 <= wait < 0.6 for wait in waits), "each answer timed from its own request"


def test_stages_split_each_latency_at_storing_and_claiming() -> None:
    submitted = {"a": 100.0, "b": 100.0}
    stored = {"a": (100.010, 100.030), "b": (100.020, 100.050)}
    arrived = {"a": 100.040, "b": 100.090}
    legs = stages(submitted, stored, arrived)
    assert legs["stored"] == {"p50": 15.0, "p95": 19.5, "p99": 19.9}
    assert legs["claimed"]["p50"] == 25.0
    assert legs["event"]["p50"] == 25.0  # (10 + 40) / 2


def test_cpu_share_counts_processes_started_meanwhile_in_full() -> None:
    before = {"postgres": {1: 10.0, 2: 5.0}, "bench": {9: 1.0}}
    after = {"postgres": {1: 10.5, 3: 0.25}, "bench": {9: 1.5}}  # 2 ended, 3 started
    assert cpu_share(before, after, seconds=2.0) == {"postgres": 37.5, "bench": 25.0}


def test_steal_is_the_share_of_all_cpu_time_the_hypervisor_took() -> None:
    # user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice
    before = [100, 0, 50, 800, 10, 0, 5, 35, 20, 0]
    after = [160, 0, 70, 880, 10, 0, 10, 60, 40, 0]  # 60+20+80+5+25 = 190 ticks, 25 stolen
    assert steal_percent(before, after) == round(100 * 25 / 190, 1)
    assert steal_percent(after, after) == 0.0
