"""The files users deploy with stay in step with the settings the service reads."""

import re
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


def test_compose_ships_no_secret_and_runs_the_service_as_a_non_superuser_role() -> None:
    text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    env = services["streamsvc"]["environment"]
    # Secrets come from the environment or compose refuses to start: `${NAME:?message}`.
    for name in ("API_KEY_ENCRYPTION_SECRET", "DB_PASSWORD"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[name]), name
    pg = services["postgres"]["environment"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", pg["POSTGRES_PASSWORD"])
    assert "SECRET:-" not in text and "PASSWORD:-" not in text  # no default for either
    # The service's role is the one the init script creates, never the superuser.
    assert env["DB_USERNAME"] == pg["SERVICE_DB_USER"] != pg["POSTGRES_USER"]
    assert env["DB_PASSWORD"] == pg["SERVICE_DB_PASSWORD"]
    assert env["DB_NAME"] == pg["POSTGRES_DB"]
    assert "./deploy/postgres:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    script = (ROOT / "deploy" / "postgres" / "10-streamsvc-role.sh").read_text()
    assert "NOSUPERUSER" in script and "NOCREATEROLE" in script
    for role in ("streamsvc", "streamsvc-flusher", "streamsvc-notifier", "streamsvc-sweeper"):
        assert services[role]["environment"] == env, role  # every role shares the same
