"""`just soak`, short: half a minute of steady load, and memory and connections stay flat
(benchmarks.soak; the full run is ten minutes)."""

from __future__ import annotations

import pytest

from benchmarks.soak import soak

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_a_short_soak_keeps_memory_and_connections_flat() -> None:
    result = await soak(30, rate=500, every_s=3)
    print(result.table())
    assert len(result.samples) >= 9
    assert result.samples[-1].finished > 0.8 * 30 * 500 - 1000, "the load was taken"
    assert not result.problems(), result.table()
