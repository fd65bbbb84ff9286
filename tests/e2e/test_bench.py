"""`just bench` works: a tiny run of every scenario, end to end, saved as JSON and PNG.

Its figures mean nothing at this size, so nothing here asserts on speed. The run is split
(each of streamsvc's ingresses; the baselines and ceilings) to stay well inside the
per-test timeout.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import report, rpc_ceiling, scenarios
from benchmarks.__main__ import SCENARIOS, bench, machine, parse

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TINY = ["--n", "300", "--n-single", "150", "--n-baseline", "300", "--n-ceiling", "256"]
REFERENCES = {
    "naive": "baseline",
    "pgqueuer": "baseline",
    "copy": "ceiling",
    "copy+update": "ceiling",
    "old-cap": "arithmetic",
    "broker": "ceiling",
}
SCENARIO_NAMES = {"old-cap": "old design cap", "broker": "broker ceiling"}


async def run_saved(names: list[str], directory: Path, *extra: str) -> list[dict[str, Any]]:
    """`python -m benchmarks --only ...` in this process: the results as saved in JSON."""
    argv = [*TINY, *extra, *(f"--only={name}" for name in names)]
    opts, out = parse([*argv, "--out", str(directory)])
    assert out == directory
    with report.Progress(Console(file=io.StringIO())) as progress:
        results = await bench(opts, progress)
    data, picture = report.save(results, machine(opts), directory)
    assert picture.exists() and picture.stat().st_size > 0
    saved = json.loads(data.read_text())
    assert saved["machine"]["n"] == 300
    return list(saved["results"])


@pytest.mark.parametrize("ingress", scenarios.INGRESSES)
async def test_every_ingress_runs_with_latency_and_memory(ingress: str, tmp_path: Path) -> None:
    asked = ["--rate", "400"] if ingress == "inbox" else []  # others: half the throughput
    results = await run_saved([ingress], tmp_path, "--latency-s", "0.5", *asked)
    assert [r["scenario"] for r in results] == [ingress]
    for r in results:
        assert r["kind"] == "streamsvc"
        assert r["operations"] == (150 if r["scenario"] == "rpc-single" else 300)
        assert r["ops_per_s"] > 0
        assert r["batches"] >= 1
        latency = r["latency_ms"]
        assert latency["rate"] == (400 if asked else round(r["ops_per_s"] / 2))
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], r
        for leg in ("stored", "claimed", "event"):  # each leg is part of the whole
            assert 0 <= latency["stages"][leg]["p50"] <= latency["p99"], r
        cpu = latency["cpu"]
        assert set(cpu) >= {"ingress", "flusher", "notifier", "postgres", "redis", "bench"}, r
        assert cpu["flusher"] > 0 and cpu["postgres"] > 0, r
        assert r["rss_mb"] and all(mb > 0 for _, mb in r["rss_mb"]), r
        assert 0 <= r["steal_pct"] <= 100, r


async def test_baselines_and_ceilings_run(tmp_path: Path) -> None:
    names = [name for name in SCENARIOS if name not in scenarios.INGRESSES]
    assert set(names) == set(REFERENCES)
    results = await run_saved(names, tmp_path)
    assert [r["scenario"] for r in results] == [SCENARIO_NAMES.get(n, n) for n in names]
    for name, r in zip(names, results, strict=True):
        assert r["kind"] == REFERENCES[name]
        assert r["ops_per_s"] > 0
    cap = results[names.index("old-cap")]
    assert cap["ops_per_s"] == 200 and cap["note"] == "LIMIT 1000 / INTERVAL 5000 ms"
    broker = results[names.index("broker")]
    assert broker["note"] == f"request/reply, no work, 64 in flight, {broker['via']}"


async def test_python_broker_ceiling_without_node() -> None:
    """Where node or tests/nestjs/node_modules is missing, the ceiling is aio-pika's."""
    assert await rpc_ceiling.python_ceiling(128, in_flight=16) > 0
