"""deploy/k8s/keda.yaml: valid KEDA objects that scale on the streams and the queue streamsvc
really uses, so that renaming a stream, a group or the queue breaks this test.

Two checks of validity: KEDA's published schema (the npm package @kubernetes-models/keda,
compiled from KEDA's CRDs, run by tests/keda/validate.mjs; skipped without node), which
knows types and required fields but accepts unknown ones and every trigger's metadata; and
field by field below, with the fields KEDA's documentation gives for the ScaledObject spec
and for the redis-streams, rabbitmq and cpu scalers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from streamsvc.adapters.streams import FLUSHER_GROUP, INGRESS_GROUP, PRIORITIES, Names
from tests.support.manifests import KEDA_API, ROOT, Obj, applied, config, deployments, secrets

KEDA_SCHEMA = ROOT / "tests" / "keda"
NPM_TIMEOUT_S = 300


def fields(names: str) -> set[str]:
    return set(names.split())


SPEC = fields("""
    scaleTargetRef pollingInterval cooldownPeriod initialCooldownPeriod idleReplicaCount
    minReplicaCount maxReplicaCount fallback advanced triggers
""")
TRIGGER = fields("type name metadata metricType useCachedMetrics authenticationRef")
# Each scaler's metadata: (required, optional), as its page in KEDA's docs lists them.
SCALERS = {
    "redis-streams": (
        {"stream"},
        fields("""
            address host port addressFromEnv hostFromEnv portFromEnv usernameFromEnv
            passwordFromEnv consumerGroup pendingEntriesCount streamLength lagCount
            activationLagCount enableTLS unsafeSsl databaseIndex
        """),
    ),
    "rabbitmq": (
        {"queueName"},
        fields("""
            host hostFromEnv protocol mode value activationValue vhostName useRegex pageSize
            operation timeout excludeUnacknowledged unsafeSsl
        """),
    ),
    "cpu": ({"value"}, {"containerName"}),
}
AUTH_PARAMETERS = {"redis-streams": {"password", "username"}, "rabbitmq": {"host"}}


def keda_objects() -> list[Obj]:
    return [o for o in applied() if o["apiVersion"] == KEDA_API]


def scaled(role: str) -> Obj:
    target = f"streamsvc-{role}"
    objects = [o for o in keda_objects() if o["kind"] == "ScaledObject"]
    (found,) = [o for o in objects if o["spec"]["scaleTargetRef"]["name"] == target]
    return dict(found["spec"])


def triggers(role: str, kind: str) -> list[Obj]:
    return [t for t in scaled(role)["triggers"] if t["type"] == kind]


def _installed() -> bool:
    installed = KEDA_SCHEMA / "node_modules" / ".package-lock.json"
    lock = KEDA_SCHEMA / "package-lock.json"
    return installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime


@pytest.fixture(scope="module")
def keda_schema() -> Path:
    """tests/keda with its packages installed (`npm ci`); skips when node or npm is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node is not installed: KEDA's published schema is an npm package")
    if not _installed():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=KEDA_SCHEMA,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, f"npm ci in {KEDA_SCHEMA}:\n{done.stdout}\n{done.stderr}"
    return KEDA_SCHEMA


@pytest.mark.timeout(NPM_TIMEOUT_S + 60)  # a first `npm ci` counts towards the test's time
def test_keda_objects_match_kedas_published_schema(keda_schema: Path) -> None:
    def validate(objects: list[Obj]) -> list[str | None]:
        done = subprocess.run(
            ["node", "validate.mjs"],
            cwd=keda_schema,
            input=json.dumps(objects),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return list(json.loads(done.stdout))

    objects = keda_objects()
    assert {o["kind"] for o in objects} == {"ScaledObject", "TriggerAuthentication"}
    assert validate(objects) == [None] * len(objects)
    # and the schema does refuse what KEDA would
    broken = json.loads(json.dumps(objects[-1]))
    broken["spec"]["minReplicaCount"] = "2"
    assert "minReplicaCount must be integer" in str(validate([broken]))


def test_scaled_objects_use_only_the_fields_keda_documents() -> None:
    for obj in keda_objects():
        if obj["kind"] != "ScaledObject":
            continue
        spec = obj["spec"]
        assert set(spec) <= SPEC, set(spec) - SPEC
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            assert set(trigger) <= TRIGGER, set(trigger) - TRIGGER
            required, optional = SCALERS[trigger["type"]]
            metadata = trigger["metadata"]
            assert required <= set(metadata) <= required | optional, trigger
            assert all(isinstance(v, str) for v in metadata.values()), trigger  # map of strings


def test_a_role_at_zero_would_take_nothing_over_so_none_scales_to_zero() -> None:
    for obj in keda_objects():
        if obj["kind"] == "ScaledObject":
            assert obj["spec"]["minReplicaCount"] >= 1
            assert "idleReplicaCount" not in obj["spec"]


def test_keda_owns_the_replicas_of_what_it_scales_and_only_those() -> None:
    targets = {
        o["spec"]["scaleTargetRef"]["name"] for o in keda_objects() if o["kind"] == "ScaledObject"
    }
    assert targets == {"streamsvc-ingress", "streamsvc-flusher"}
    for role, deployment in deployments().items():
        if deployment["metadata"]["name"] in targets:
            assert "replicas" not in deployment["spec"], role  # an apply would reset it
        else:
            assert deployment["spec"]["replicas"] >= 1, role


def test_flushers_scale_on_the_lag_of_their_group_on_every_work_stream() -> None:
    names = Names(config()["STREAMSVC_REDIS_PREFIX"])
    lag = triggers("flusher", "redis-streams")
    assert [t["metadata"]["stream"] for t in lag] == [names.work_of(p) for p in sorted(PRIORITIES)]
    for trigger in lag:
        assert trigger["metadata"]["consumerGroup"] == FLUSHER_GROUP
        assert int(trigger["metadata"]["lagCount"]) > 0
        assert "pendingEntriesCount" not in trigger["metadata"]  # bounded by the actors: no signal
    assert len(scaled("flusher")["triggers"]) == len(lag)


def test_ingress_scales_on_the_rpc_queue_the_inbox_and_cpu() -> None:
    settings = config()
    (queue,) = triggers("ingress", "rabbitmq")
    assert queue["metadata"]["queueName"] == settings["BATCH_SERVICE_RMQ_QUEUE"]
    assert queue["metadata"]["mode"] == "QueueLength"
    (inbox,) = triggers("ingress", "redis-streams")
    assert inbox["metadata"]["stream"] == Names(settings["STREAMSVC_REDIS_PREFIX"]).inbox
    assert inbox["metadata"]["consumerGroup"] == INGRESS_GROUP
    (cpu,) = triggers("ingress", "cpu")
    assert cpu["metricType"] == "Utilization"
    (container,) = deployments()["ingress"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"]  # what utilization is a share of


def test_keda_connects_where_the_service_does_with_the_secrets_credentials() -> None:
    template = secrets()
    auths = {
        o["metadata"]["name"]: o["spec"] for o in keda_objects() if o["kind"] != "ScaledObject"
    }
    redis = urlsplit(template["streamsvc-secrets"]["REDIS_URL"])
    for role in ("ingress", "flusher"):
        for trigger in scaled(role)["triggers"]:
            if trigger["type"] == "cpu":
                continue
            auth = auths[trigger["authenticationRef"]["name"]]
            for ref in auth["secretTargetRef"]:
                assert ref["parameter"] in AUTH_PARAMETERS[trigger["type"]]
                assert ref["key"] in template[ref["name"]], ref
            metadata = trigger["metadata"]
            if trigger["type"] == "redis-streams":
                assert metadata["address"] == redis.netloc.rpartition("@")[2]
                assert metadata["databaseIndex"] == redis.path.lstrip("/")
            else:  # the AMQP URL the service uses, credentials and vhost included
                assert metadata["protocol"] == "amqp"
                assert [r["key"] for r in auth["secretTargetRef"]] == ["BATCH_SERVICE_RMQ_URL"]
