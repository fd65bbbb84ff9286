"""The baselines `just bench` compares with run and land every effect exactly once. Each
function verifies its own database afterwards; its figures at this size mean nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from benchmarks import baselines, workload

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

Baseline = Callable[[workload.Workload], Awaitable[dict[str, Any]]]


@pytest.mark.parametrize(
    ("run", "scenario", "kind"),
    [
        (baselines.naive, "naive", "baseline"),
        (baselines.peer, "pgqueuer", "baseline"),
        (baselines.copy_ceiling, "copy", "ceiling"),
        (baselines.copy_update_ceiling, "copy+update", "ceiling"),
    ],
    ids=["naive", "pgqueuer", "copy", "copy+update"],
)
async def test_baseline_lands_the_workload(run: Baseline, scenario: str, kind: str) -> None:
    result = await run(workload.build(300))
    assert set(result) == {"scenario", "kind", "operations", "seconds", "ops_per_s"}
    assert (result["scenario"], result["kind"]) == (scenario, kind)
    assert result["operations"] == 300
    assert result["seconds"] > 0
    assert result["ops_per_s"] > 0


async def test_ceilings_chunk_the_workload() -> None:
    """More than one chunk: each chunk's bookkeeping and effects commit on their own."""
    result = await baselines.copy_update_ceiling(workload.build(300), chunk=128)
    assert result["operations"] == 300
