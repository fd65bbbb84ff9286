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
    assert {"postgres", "redis", "rabbitmq", "streamsvc"} <= set(services)
    assert all("healthcheck" in s for s in services.values())
    assert set(services["streamsvc"]["environment"]) <= set(env_names())
