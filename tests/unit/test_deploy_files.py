"""The files users deploy with stay in step with the settings the service reads."""

from pathlib import Path

import yaml
from dotenv import dotenv_values

from streamsvc.settings import env_names, load

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_lists_every_setting_with_its_default() -> None:
    values = dotenv_values(ROOT / ".env.example")
    assert list(values) == list(env_names())
    example = load({k: v or "" for k, v in values.items()}, env_file=None)
    assert example == load({}, env_file=None)


def test_compose_passes_only_settings_the_service_knows() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    roles = {"streamsvc", "streamsvc-flusher", "streamsvc-notifier", "streamsvc-sweeper"}
    assert {"postgres", "redis", "rabbitmq", *roles} <= set(services)
    assert all("healthcheck" in s for s in services.values())
    for name in roles:
        assert set(services[name]["environment"]) <= set(env_names()), name
    commands = [services[name]["command"][0] for name in sorted(roles)]
    assert [c.split("--role ")[1] for c in commands] == [
        "ingress",
        "flusher",
        "notifier",
        "sweeper",
    ]


def test_grafana_dashboard_queries_only_metrics_the_service_declares() -> None:
    import json
    import re

    from prometheus_client import REGISTRY

    from streamsvc import metrics  # noqa: F401 - declares them

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    declared = {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/streamsvc.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert any("Throughput" in t for t in titles) and any("Latency" in t for t in titles)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"streamsvc_[a-z_]+", target["expr"]))
            assert used and used <= declared, (panel["title"], used - declared)
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    ours = sorted(f"{name}:3000" for name in compose["services"] if name.startswith("streamsvc"))
    assert sorted(prometheus["scrape_configs"][0]["static_configs"][0]["targets"]) == ours
    assert {"prometheus", "grafana"} <= set(compose["services"])
