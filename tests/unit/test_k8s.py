"""deploy/k8s/'s core objects are valid Kubernetes and stay in step with the service: its
settings, roles, image, routes, port and shutdown (KEDA's objects: test_k8s_keda.py)."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from litestar.testing import TestClient

from streamsvc.api import http
from streamsvc.errors import ConfigError
from streamsvc.settings import check_secret, env_names, load
from streamsvc.supervisor import READY_TIMEOUT_S, ROLES
from tests.support.manifests import (
    K8S,
    KEDA_API,
    SECRET_TEMPLATE,
    Obj,
    applied,
    config,
    containers,
    deployments,
    dockerfile,
    documents,
    kustomization,
    named,
    pod,
    project_version,
    secrets,
)

# The Kubernetes version the objects are checked against: kubernetes-validate's strict
# schemas (unknown fields are errors, as with `kubectl apply --validate=strict`).
KUBERNETES = "1.33"


def core_objects() -> list[Obj]:
    return [o for o in applied() + documents(SECRET_TEMPLATE) if o["apiVersion"] != KEDA_API]


@pytest.mark.parametrize(
    "obj", core_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_every_core_object_is_valid_kubernetes(obj: Obj) -> None:
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATE.name}
    assert sorted(kustomization()["resources"]) == sorted(files)


def test_one_deployment_per_role_runs_that_role_from_the_dockerfiles_image() -> None:
    entrypoint, (uid, gid) = dockerfile()
    assert entrypoint == ["streamsvc"]
    found = deployments()
    assert sorted(found) == sorted(r for r in ROLES if r != "all")
    for role, deployment in found.items():
        (container,) = pod(deployment)["containers"]
        assert entrypoint + container["args"] == ["streamsvc", "run", "--role", role]
        assert "command" not in container  # the image's ENTRYPOINT runs
        for each in containers(deployment):
            assert each["image"] == f"streamsvc:{project_version()}", role
        security = pod(deployment)["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid), role


def test_ingress_migrates_the_database_before_it_runs() -> None:
    ingress = pod(deployments()["ingress"])
    (migrate,) = ingress["initContainers"]
    (container,) = ingress["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["envFrom"] == container["envFrom"]
    for role, deployment in deployments().items():
        assert role == "ingress" or "initContainers" not in pod(deployment)


def test_every_pod_reads_the_configmap_and_the_secret() -> None:
    sources = [
        {"configMapRef": {"name": "streamsvc-config"}},
        {"secretRef": {"name": "streamsvc-secrets"}},
    ]
    for role, deployment in deployments().items():
        for container in containers(deployment):
            assert container["envFrom"] == sources, role
            assert "env" not in container, role


def test_configmap_and_secret_hold_only_settings_the_service_reads() -> None:
    settings, secret = config(), secrets()["streamsvc-secrets"]
    assert set(settings) <= set(env_names()), set(settings) - set(env_names())
    assert set(secret) <= set(env_names()), set(secret) - set(env_names())
    assert not set(settings) & set(secret)  # one source for each, or envFrom's order decides
    assert {
        "API_KEY_ENCRYPTION_SECRET",
        "DB_PASSWORD",
        "REDIS_URL",
        "BATCH_SERVICE_RMQ_URL",
    } == set(secret)
    loaded = load({**settings, **secret}, env_file=None)  # every value parses
    assert loaded.production and loaded.auth_on


def test_the_secret_template_cannot_run_as_it_is() -> None:
    template = secrets()
    for name, data in template.items():
        for key, value in data.items():
            assert "CHANGE-ME" in value, (name, key)
    with pytest.raises(ConfigError, match="API_KEY_ENCRYPTION_SECRET"):
        check_secret(template["streamsvc-secrets"]["API_KEY_ENCRYPTION_SECRET"], "required")
    # KEDA takes Redis's password apart from REDIS_URL: the same one.
    redis = urlsplit(template["streamsvc-secrets"]["REDIS_URL"])
    assert template["streamsvc-keda"]["redis-password"] == redis.password


def test_probes_ask_the_real_routes_on_the_http_port() -> None:
    port = int(config()["STREAMSVC_HTTP_PORT"])

    async def ready() -> list[str]:
        return []

    app = http.create_app(cast(Any, None), cast(Any, None), ready, max_body_bytes=1024)
    with TestClient(app) as client:
        for role, deployment in deployments().items():
            (container,) = pod(deployment)["containers"]
            assert container["ports"] == [{"name": "http", "containerPort": port}], role
            probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
            assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz", role
            assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz", role
            # /readyz answers within READY_TIMEOUT_S however long a server takes
            assert probes["readinessProbe"]["timeoutSeconds"] > READY_TIMEOUT_S, role
            for probe in probes.values():
                assert probe["httpGet"]["port"] == "http", role
                assert client.get(probe["httpGet"]["path"]).status_code == 200, role


def test_pods_get_a_grace_period_beyond_the_services_own() -> None:
    grace_s = int(config()["STREAMSVC_SHUTDOWN_GRACE_S"])
    for role, deployment in deployments().items():
        (container,) = pod(deployment)["containers"]
        pause_s = 0
        if "lifecycle" in container:
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep", role
            pause_s = int(command[1])
        # the pause, then in-flight batches for grace_s, then the last commits and acks
        assert pod(deployment)["terminationGracePeriodSeconds"] >= pause_s + grace_s + 10, role


def test_pods_run_locked_down() -> None:
    for role, deployment in deployments().items():
        spec = pod(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert spec["automountServiceAccountToken"] is False, role
        # Service links would put STREAMSVC_PORT, STREAMSVC_SERVICE_HOST... in the environment.
        assert spec["enableServiceLinks"] is False, role
        for container in containers(deployment):
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, (role, container["name"])


def test_every_container_requests_no_more_than_its_limits() -> None:
    units = {"m": 0.001, "Mi": 2**20, "Gi": 2**30}

    def amount(text: str) -> float:
        for suffix, factor in units.items():
            if text.endswith(suffix):
                return float(text[: -len(suffix)]) * factor
        return float(text)

    for role, deployment in deployments().items():
        for container in containers(deployment):
            resources = container["resources"]
            for what in ("cpu", "memory"):
                request, limit = resources["requests"][what], resources["limits"][what]
                assert 0 < amount(request) <= amount(limit), (role, what)


def test_the_service_and_the_scrape_annotations_reach_the_http_port() -> None:
    port = config()["STREAMSVC_HTTP_PORT"]
    service = named("Service")["streamsvc"]["spec"]
    ingress = deployments()["ingress"]
    assert service["selector"] == ingress["spec"]["selector"]["matchLabels"]
    assert service["ports"] == [{"name": "http", "port": int(port), "targetPort": "http"}]
    for role, deployment in deployments().items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": port,
            "prometheus.io/path": "/metrics",
        }, role
