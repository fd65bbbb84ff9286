"""`just bench` works: a tiny run of every scenario, end to end. Its figures mean nothing."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import SCENARIOS, run_scenario

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_scenario_runs_to_completion(scenario: str) -> None:
    result = await run_scenario(scenario, 300, flushers=1, limit=100)
    assert result["operations"] == 300
    assert result["batches"] >= 1
    assert result["ops_per_s"] > 0
