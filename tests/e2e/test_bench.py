"""`just bench` works: a tiny run of every scenario, end to end, saved as JSON and PNG.

Its figures mean nothing at this size, so nothing here asserts on speed. The run is split
(each of streamsvc's ingresses; the baselines and ceilings; each scheduling scenario) to
stay well inside the per-test timeout. The scheduling scenarios check what they measure
themselves (every effect once, delayed ones never early, each key's updates in order);
here they run small, marked slow.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from benchmarks import report, rpc_ceiling, scenarios
from benchmarks.__main__ import FEATURES, OPT_IN, SCENARIOS, SWEEP, bench, machine, parse
from tests.conftest import NPM_TIMEOUT_S

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TINY = ["--n", "300", "--n-single", "150", "--n-baseline", "300", "--n-ceiling", "256"]
# The scheduling scenarios, small: a backlog of 30 batches of 100, 10 keys of 10 updates.
SMALL = [
    *("--n", "1000", "--n-backlog", "3000", "--n-probes", "20"),
    *("--n-delayed", "200", "--hot-keys", "10", "--limit", "100"),
]
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
    assert saved["machine"]["n"] == opts.n
    return list(saved["results"])


@pytest.mark.timeout(NPM_TIMEOUT_S + 120)  # rpc-single's first `npm ci` counts towards it
@pytest.mark.parametrize("ingress", scenarios.INGRESSES)
async def test_every_ingress_runs_with_latency_and_memory(
    ingress: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if ingress == "rpc-single":  # the callers' own client: skipped where node cannot run it
        request.getfixturevalue("nestjs")
    asked = ["--rate", "400"] if ingress == "inbox" else []  # others: half the throughput
    results = await run_saved([ingress], tmp_path, "--latency-s", "0.5", *asked)
    assert [r["scenario"] for r in results] == [ingress]
    for r in results:
        assert r["kind"] == "streamsvc"
        assert r["operations"] == (150 if r["scenario"].startswith("rpc-single") else 300)
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
    clients = {"rpc-single": "via NestJS ClientRMQ", "rpc-single-py": "via aio-pika"}
    if ingress in clients:
        assert results[0]["note"] == clients[ingress]


async def test_baselines_and_ceilings_run(tmp_path: Path) -> None:
    others = (*scenarios.INGRESSES, *FEATURES, *OPT_IN, SWEEP)
    names = [name for name in SCENARIOS if name not in others]
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


async def test_the_rate_sweep_gives_cpu_batch_sizes_and_latency_at_each_rate(
    tmp_path: Path,
) -> None:
    """Without the ingresses' own runs in the same bench, the sweep measures their maxima
    first; then each rate below the maximum, then the maximum."""
    # Enough operations at each maximum for every process's CPU to span clock ticks (10 ms):
    # with gathering, 300 through the inbox cost the flusher less than one.
    sizes = ("--n", "3000", "--n-single", "600")
    points = await run_saved([SWEEP], tmp_path, *sizes, "--latency-s", "0.5", "--sweep-rates", "50")
    offered = [(p["ingress"], p["offered"]) for p in points if not p.get("maximum")]
    assert offered == [("inbox", 50), ("rpc-single", 50)]
    assert [p["ingress"] for p in points if p.get("maximum")] == ["inbox", "rpc-single"]
    for p in points:
        assert p["kind"] == "sweep"
        cpu = p["cpu_us"]
        assert cpu["service+servers"] > 0 and cpu["flusher"] > 0 and cpu["postgres"] > 0, p
        assert cpu["service+servers"] == pytest.approx(
            sum(us for name, us in cpu.items() if name not in ("bench", "service+servers")),
            abs=1,
        )
        batches = p["mean_batches"]
        assert set(batches) == {"intake", "flush", "relay"}, p
        assert all(size >= 1 for size in batches.values()), p
        if not p.get("maximum"):
            latency = p["latency_ms"]
            assert 0 < latency["p50"] <= latency["p99"], p
            # where a caller waits for its answer (not the inbox's producer), that too
            waits = {"reply"} if p["ingress"] != "inbox" else set()
            assert set(latency["stages"]) == {"stored", "claimed", "event", *waits}, p
            for leg in waits:
                assert 0 < latency["stages"][leg]["p50"] <= latency["stages"][leg]["p99"], p
    charts = [path async for path in anyio.Path(tmp_path).glob("sweep-*.png")]
    assert charts, "the sweep's chart is saved beside the bench's"


async def test_python_broker_ceiling_without_node() -> None:
    """Where node or tests/nestjs/node_modules is missing, the ceiling is aio-pika's."""
    assert await rpc_ceiling.python_ceiling(128, in_flight=16) > 0


@pytest.mark.slow
async def test_priority_probes_are_applied_ahead_of_the_backlogs_median(tmp_path: Path) -> None:
    # A backlog long enough that the probes (20, 5 ms apart) all go in before half of it
    # is applied, however fast this machine drains it.
    high, low = await run_saved(["priority"], tmp_path, *SMALL, "--n-backlog", "10000")
    assert [high["scenario"], low["scenario"]] == ["priority 9 probes", "priority 0 probes"]
    for r in (high, low):
        assert r["operations"] == 20 and r["backlog"] == 10000, r
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"], r
        assert "x_naive" not in r and "ops_per_s" not in r
    assert high["ahead_of_median"] == 20, high  # each before half of the backlog
    assert set(high["x_priority_0"]) == {"p50", "p99"}


@pytest.mark.slow
async def test_delayed_operations_are_applied_once_and_never_early(tmp_path: Path) -> None:
    (r,) = await run_saved(["delayed"], tmp_path, *SMALL)
    assert r["scenario"] == "delayed" and r["operations"] == 200 and r["processes"] == 3
    assert r["early"] == 0  # the scenario also checks every insert landed once
    assert 0 <= r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["lateness_max_ms"], r


@pytest.mark.slow
async def test_hot_keys_run_with_and_without_keys_each_key_in_order(tmp_path: Path) -> None:
    plain, keyed = await run_saved(["hot-keys"], tmp_path, *SMALL)
    # the keyed run checked each key's updates stored and applied in order, each row last
    assert [plain["scenario"], keyed["scenario"]] == ["hot-keys, no keys", "hot-keys"]
    assert plain["operations"] == keyed["operations"] == 1000
    assert plain["ops_per_s"] > 0 and keyed["ops_per_s"] > 0
    assert keyed["note"].startswith("10% under 10 orderingKeys (10 each): x"), keyed


def test_retention_runs_only_when_asked_for() -> None:
    assert "retention" not in parse([])[0].names
    assert parse(["--only", "retention"])[0].names == ["retention"]


@pytest.mark.slow
async def test_retention_measures_intake_while_old_rows_are_deleted(tmp_path: Path) -> None:
    on, off = await run_saved(
        ["retention"], tmp_path, "--n-old", "50000", "--n-retention", "300", "--limit", "100"
    )
    assert [on["scenario"], off["scenario"]] == ["retention on", "retention off"]
    for r in (on, off):  # each run checked every effect and status of its workload
        assert r["operations"] == 300 and r["old"] == 50_000 and r["ops_per_s"] > 0, r
    # the run itself fails unless old rows were left to delete when the workload was done
    assert on["deleted_per_s"] >= 0 and on["deleted_after_per_s"] > 0, on
    assert "deleted_per_s" not in off
