"""The Kubernetes manifests of deploy/k8s/, read as the API server would get them."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SECRET_TEMPLATE = K8S / "secret.template.yaml"
KEDA_API = "keda.sh/v1alpha1"

Obj = dict[str, Any]


def documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> Obj:
    (doc,) = documents(K8S / "kustomization.yaml")
    return doc


def applied() -> list[Obj]:
    """Every object `kubectl apply -k deploy/k8s` sends, in its files' order."""
    return [obj for name in kustomization()["resources"] for obj in documents(K8S / name)]


def named(kind: str, objects: list[Obj] | None = None) -> dict[str, Obj]:
    """The objects of one kind, by metadata.name."""
    return {o["metadata"]["name"]: o for o in objects or applied() if o["kind"] == kind}


def secrets() -> dict[str, dict[str, str]]:
    """The Secret template's Secrets: name -> stringData."""
    return {n: o["stringData"] for n, o in named("Secret", documents(SECRET_TEMPLATE)).items()}


def config() -> dict[str, str]:
    return dict(named("ConfigMap")["streamsvc-config"]["data"])


def deployments() -> dict[str, Obj]:
    """The Deployments by the role they run (``args: [run, --role, ROLE]``)."""
    found = {}
    for deployment in named("Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        found[container["args"][container["args"].index("--role") + 1]] = deployment
    return found


def pod(deployment: Obj) -> Obj:
    return dict(deployment["spec"]["template"]["spec"])


def containers(deployment: Obj) -> list[Obj]:
    """Every container of the pod, init containers first."""
    spec = pod(deployment)
    return [*spec.get("initContainers", []), *spec["containers"]]


def dockerfile() -> tuple[list[str], tuple[int, int]]:
    """deploy/Dockerfile's ENTRYPOINT and the uid:gid of its USER."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.M)
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert entrypoint and user, "deploy/Dockerfile: no ENTRYPOINT or USER uid:gid"
    return json.loads(entrypoint[1]), (int(user[1]), int(user[2]))


def project_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])
