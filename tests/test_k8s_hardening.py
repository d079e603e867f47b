"""Pods are hardened, probed, sized, and the trainer lands on GPUs where it should.

Checked on the rendered overlays (what is applied), not on the base files: a
patch in an overlay that drops a securityContext or a probe fails here.
"""

from __future__ import annotations

import os
import re

import pytest
from k8s_render import (
    K8S,
    OVERLAYS,
    SERVICES,
    config_map,
    containers,
    find,
    main_container,
    of_kind,
    overlay,
    pod_spec,
    render,
    render_directory,
    workloads,
)


def all_pods(name: str):
    return [(w["kind"], w["metadata"]["name"], w) for w in workloads(overlay(name))]


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_run_as_non_root_with_seccomp(name):
    for kind, workload_name, workload in all_pods(name):
        security = pod_spec(workload).get("securityContext", {})
        assert security.get("runAsNonRoot") is True, f"{kind}/{workload_name}"
        assert security.get("runAsUser", 0) > 0, f"{kind}/{workload_name}"
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{kind}/{workload_name}"
        assert pod_spec(workload).get("automountServiceAccountToken") is False, f"{kind}/{workload_name}"
        assert pod_spec(workload).get("hostNetwork") is not True


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_is_locked_down(name):
    for kind, workload_name, workload in all_pods(name):
        for container in containers(workload):
            where = f"{kind}/{workload_name}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("privileged", False) is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            assert security.get("runAsUser", 1) != 0, where


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_has_requests_and_limits(name):
    for kind, workload_name, workload in all_pods(name):
        for container in containers(workload):
            where = f"{kind}/{workload_name}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory", "ephemeral-storage"):
                    assert resource in resources.get(bound, {}), f"{where}: no {bound}.{resource}"
            assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"]), where
            assert quantity(resources["requests"]["cpu"]) <= quantity(resources["limits"]["cpu"]), where


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_accounts_exist_and_mount_no_token(name):
    objects = overlay(name)
    for _, workload_name, workload in all_pods(name):
        account = pod_spec(workload).get("serviceAccountName")
        assert account, f"{workload_name} runs as the default service account"
        assert find(objects, "ServiceAccount", account).get("automountServiceAccountToken") is False


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_are_probed_on_health_and_readiness(name):
    objects = overlay(name)
    for service in SERVICES:
        container = main_container(find(objects, "Deployment", service))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8080}
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("SEAL_HTTP_PORT") == "8080"
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{service} {probe}"
            assert ports.get(get["port"], get["port"]) == 8080, f"{service} {probe}"
        # Liveness must outlast an event loop busy for a few seconds, and a minute of them.
        assert container["livenessProbe"]["timeoutSeconds"] > 5
        assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"]["periodSeconds"] >= 60


@pytest.mark.parametrize("name", OVERLAYS)
def test_infrastructure_is_probed(name):
    objects = overlay(name)
    for kind, workload in (("StatefulSet", "nats"), ("StatefulSet", "minio"), ("Deployment", "otel-collector")):
        container = main_container(find(objects, kind, workload))
        for probe in ("livenessProbe", "readinessProbe"):
            assert "httpGet" in container[probe], f"{workload} {probe}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_writable_paths_are_volumes(name):
    """The root filesystem is read-only: /tmp and the model cache must be mounted volumes."""
    objects = overlay(name)
    settings = config_map(objects, "seal-config")["data"]
    for service in SERVICES:
        deployment = find(objects, "Deployment", service)
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        mounts = {m["mountPath"]: m for m in main_container(deployment)["volumeMounts"]}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]]
        env = {e["name"]: e.get("value") for e in main_container(deployment)["env"]}
        cache_paths = [settings["SEAL_MODEL__CACHE_DIR"], settings["HF_HOME"]]
        cache_paths += [v for k, v in env.items() if k.endswith("_CACHE_DIR") and v]
        for path in cache_paths:
            mount = next((m for p, m in mounts.items() if path == p or path.startswith(p.rstrip("/") + "/")), None)
            assert mount is not None, f"{service}: {path} is not on a volume"
            assert not mount.get("readOnly"), f"{service}: {path} is read-only"
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume


@pytest.mark.parametrize("name", OVERLAYS)
def test_init_container_provisions_with_the_pods_settings(name):
    objects = overlay(name)
    for service in SERVICES:
        deployment = find(objects, "Deployment", service)
        (init,) = pod_spec(deployment)["initContainers"]
        assert init["image"] == main_container(deployment)["image"]
        assert init["command"][-1].endswith("/provision.py")
        mounts = {m["mountPath"] for m in init["volumeMounts"]}
        assert {"/run/secrets/seal", "/etc/seal/provision"} <= mounts


def gpu(container: dict, bound: str) -> int:
    return int(container.get("resources", {}).get(bound, {}).get("nvidia.com/gpu", 0))


def tolerates_gpu_taint(workload: dict) -> bool:
    return any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" for t in pod_spec(workload).get("tolerations", []))


@pytest.mark.parametrize("path", ["base", "overlays/prod"])
def test_trainer_requests_a_gpu_and_tolerates_gpu_taints(path):
    trainer = find(render(path), "Deployment", "trainer")
    container = main_container(trainer)
    assert gpu(container, "requests") == gpu(container, "limits") == 1
    assert tolerates_gpu_taint(trainer)
    assert not container["image"].endswith("-cpu"), "the GPU trainer needs the CUDA image"
    shm = [v for v in pod_spec(trainer)["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm, "torch needs a larger /dev/shm than the container default"


def qos_class(workload: dict) -> str:
    """Kubernetes' QoS class of a pod: only CPU and memory count, init containers too; a
    request left out defaults to its limit."""
    bounds = []
    for container in containers(workload):
        resources = container.get("resources", {})
        limits = resources.get("limits", {})
        requests = {**limits, **resources.get("requests", {})}
        bounds += [(requests.get(r), limits.get(r)) for r in ("cpu", "memory")]
    if all(req is None and lim is None for req, lim in bounds):
        return "BestEffort"
    if all(lim is not None and req is not None and quantity(req) == quantity(lim) for req, lim in bounds):
        return "Guaranteed"
    return "Burstable"


def test_prod_trainer_is_guaranteed():
    """A training run holds a GPU for minutes: under node memory pressure the kubelet evicts
    Burstable pods before Guaranteed ones, so the trainer must not be the one to go."""
    trainer = find(overlay("prod"), "Deployment", "trainer")
    assert qos_class(trainer) == "Guaranteed"
    container = main_container(trainer)
    memory = quantity(container["resources"]["limits"]["memory"])
    assert memory >= 16 * 2**30, "the trainer holds the base model, its optimizer state and /dev/shm"
    assert quantity(container["resources"]["limits"]["cpu"]) >= 4
    # /dev/shm is memory-backed: it counts against the same limit, and must leave most of it.
    (shm,) = [v for v in pod_spec(trainer)["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert quantity(shm["emptyDir"]["sizeLimit"]) <= memory / 8


def test_qos_check_can_fail():
    """The check above tells a Burstable pod: the base trainer (limits above requests) is one."""
    assert qos_class(find(render("base"), "Deployment", "trainer")) == "Burstable"
    assert qos_class({"spec": {"template": {"spec": {"containers": [{"name": "x"}]}}}}) == "BestEffort"


def broker_drain_seconds() -> float:
    """How long FastStream drains in-flight messages after SIGTERM (shared/broker.py)."""
    match = re.search(r"graceful_timeout=([0-9.]+)", (K8S.parent / "shared" / "broker.py").read_text())
    assert match, "shared/broker.py sets no graceful_timeout"
    return float(match.group(1))


def pre_stop_seconds(container: dict) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0
    assert "sleep" in pre_stop, f"{container['name']}: preStop should be the kubelet's sleep action: {pre_stop}"
    return int(pre_stop["sleep"]["seconds"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_registry_keeps_serving_while_it_leaves_the_endpoints(name):
    """The registry serves HTTP behind a Service: a short preStop sleep lets kube-proxy and
    ingresses stop routing to a terminating pod before uvicorn stops accepting."""
    registry = find(overlay(name), "Deployment", "registry")
    assert 3 <= pre_stop_seconds(main_container(registry)) <= 15


@pytest.mark.parametrize("name", OVERLAYS)
def test_grace_period_covers_pre_stop_and_drain(name):
    drain = broker_drain_seconds()
    for service in SERVICES:
        deployment = find(overlay(name), "Deployment", service)
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        # preStop runs inside the grace period; SIGTERM follows, then the drain; 10 s to exit.
        needed = pre_stop_seconds(main_container(deployment)) + drain + 10
        assert grace >= needed, f"{service}: {grace} s grace, needs {needed} s"


def test_dev_is_cpu_only():
    objects = overlay("dev")
    for workload in workloads(objects):
        for container in containers(workload):
            assert gpu(container, "requests") == gpu(container, "limits") == 0, workload["metadata"]["name"]
        assert not tolerates_gpu_taint(workload)
    for service in ("trainer", "evaluator"):
        assert main_container(find(objects, "Deployment", service))["image"].endswith("-cpu"), service


def test_only_the_trainer_asks_for_gpus_in_prod():
    objects = overlay("prod")
    asking = {w["metadata"]["name"] for w in workloads(objects) for c in containers(w) if gpu(c, "limits")}
    assert asking == {"trainer"}


def test_evaluator_gpu_component_puts_the_evaluator_on_a_gpu(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'prod', tmp_path)}\n"
        f"components:\n  - {os.path.relpath(K8S / 'components' / 'evaluator-gpu', tmp_path)}\n"
    )
    evaluator = find(render_directory(tmp_path), "Deployment", "evaluator")
    assert gpu(main_container(evaluator), "requests") == gpu(main_container(evaluator), "limits") == 1
    assert tolerates_gpu_taint(evaluator)
    # a rollout never needs a spare GPU (a surge pod would wait for one on a full pool)
    assert evaluator["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    env = {e["name"]: e.get("value") for e in main_container(evaluator)["env"]}
    assert env["SEAL_MODEL__DEVICE"] == "cuda"
    # Without the component it stays on the CPU, even where a node's runtime shows it every GPU.
    plain = {e["name"]: e.get("value") for e in main_container(find(overlay("prod"), "Deployment", "evaluator"))["env"]}
    assert plain["SEAL_MODEL__DEVICE"] == "cpu"


def test_model_threads_follow_the_cpu_limit():
    """torch would otherwise start one thread per node CPU and fight the CPU limit."""
    objects = overlay("prod")
    for service in SERVICES:
        env = {e["name"]: e for e in main_container(find(objects, "Deployment", service))["env"]}
        for var in ("SEAL_MODEL__THREADS", "OMP_NUM_THREADS"):
            ref = env[var]["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and ref["containerName"] == service


def test_namespace_enforces_restricted_pod_security():
    for name in OVERLAYS:
        (namespace,) = of_kind(overlay(name), "Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


UNITS = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    number, unit = match.groups()
    return float(number) * UNITS.get(unit, 1)
