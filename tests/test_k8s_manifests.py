"""Every overlay renders, validates offline against Kubernetes' schemas, and scales as designed.

What CI checks for k8s/: ``kubectl kustomize`` renders each overlay, then
``kubernetes-validate --strict`` validates the built-in kinds against the oldest
and newest Kubernetes versions we support (unknown fields are errors). It skips
custom resources, so KEDA's ScaledObjects are validated against the schema
committed in k8s/schemas/, and checked against shared/subjects.py: a scaler
that names a consumer nobody reads would never scale anything.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tomllib

import jsonschema
import pytest
import yaml
from k8s_render import (
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    SERVICES,
    find,
    main_container,
    of_kind,
    overlay,
    render_directory,
    render_text,
    tool,
    workloads,
)

from shared import subjects

KEDA_SCHEMA = json.loads((K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json").read_text())
CUSTOM_GROUPS = ("keda.sh/",)


def test_the_overlays_are_dev_and_prod():
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_strictly(name, version, tmp_path):
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(render_text(f"overlays/{name}"))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, str(rendered)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    errors = [line for line in lines if not line.startswith(("INFO", "WARN"))]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr
    # Only custom resources may be skipped ("Couldn't find schema"); everything else must pass.
    for line in lines:
        if line.startswith("WARN"):
            assert any(group in line for group in CUSTOM_GROUPS), line
    objects = overlay(name)
    builtin = [o for o in objects if not o["apiVersion"].startswith(CUSTOM_GROUPS)]
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(builtin)


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    """The check above can fail: a misspelt field in a Deployment is an error."""
    broken = render_text("overlays/dev").replace("revisionHistoryLimit:", "revisionHistoryLimt:", 1)
    rendered = tmp_path / "broken.yaml"
    rendered.write_text(broken)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[0], "--quiet", str(rendered)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "revisionHistoryLimt" in result.stdout


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_service_is_deployed_once(name):
    objects = overlay(name)
    for service in SERVICES:
        deployment = find(objects, "Deployment", service)
        container = main_container(deployment)
        assert re.fullmatch(rf"(.+/)?seal/{service}:[\w.-]+", container["image"]), container["image"]
        find(objects, "ServiceAccount", service)
    for infra in ("nats", "minio"):
        find(objects, "StatefulSet", infra)
    find(objects, "Deployment", "otel-collector")
    # The registry's HTTP API and the infrastructure have Services; the workers need none.
    for name_ in ("registry", "nats", "nats-headless", "minio", "otel-collector"):
        find(objects, "Service", name_)


def test_base_images_carry_the_package_version():
    version = tomllib.loads((K8S.parent / "pyproject.toml").read_text())["project"]["version"]
    images = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]
    assert {i["name"] for i in images} == {f"seal/{s}" for s in SERVICES}
    assert {i["newTag"] for i in images} == {version}


@pytest.mark.parametrize("name", OVERLAYS)
def test_images_are_pinned(name):
    for workload in workloads(overlay(name)):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            assert re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]), f"{image} has no tag"
            assert not image.endswith(":latest"), image


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_target_named_ports_that_exist(name):
    objects = overlay(name)
    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        backing = [
            w for w in workloads(objects) if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
        ]
        assert backing, f"Service {service['metadata']['name']} selects no workload"
        ports = {p["name"] for w in backing for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def test_dev_runs_one_replica_of_everything_without_autoscaling():
    objects = overlay("dev")
    for workload in workloads(objects):
        assert workload["spec"].get("replicas") == 1, workload["metadata"]["name"]
    assert not of_kind(objects, "ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget")


def test_prod_runs_several_replicas():
    objects = overlay("prod")
    assert find(objects, "Deployment", "registry")["spec"]["replicas"] >= 2
    assert find(objects, "StatefulSet", "nats")["spec"]["replicas"] == 3
    # ... and every stream and KV bucket on all three (tests/test_nats_cluster.py: the services apply it)
    config = {k: v for cm in of_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith("seal-config")
              for k, v in cm["data"].items()}
    assert config["SEAL_NATS__STREAM_REPLICAS"] == "3"
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(objects, "ScaledObject")}
    assert set(scaled) == {"generator", "trainer", "evaluator"}
    assert scaled["generator"]["spec"]["minReplicaCount"] >= 2
    assert scaled["evaluator"]["spec"]["minReplicaCount"] >= 2
    for name, so in scaled.items():
        assert so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"] >= 1, name
        # The autoscaler owns the replica count: the Deployment leaves it unset.
        assert "replicas" not in find(objects, "Deployment", name)["spec"], name


def test_prod_has_disruption_budgets_for_services_and_nats():
    objects = overlay("prod")
    covered = {pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for pdb in of_kind(objects, "PodDisruptionBudget")}
    assert covered == {*SERVICES, "nats"}
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") is not None


def test_prod_nats_is_a_cluster_of_its_replicas():
    objects = overlay("prod")
    replicas = find(objects, "StatefulSet", "nats")["spec"]["replicas"]
    cluster_conf = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("nats-config-"))["data"][
        "cluster.conf"
    ]
    routes = re.findall(r"nats://(nats-\d+)\.nats-headless:6222", cluster_conf)
    assert routes == [f"nats-{i}" for i in range(replicas)]


# ---- KEDA ----------------------------------------------------------------------------------

KEDA_VALIDATOR = jsonschema.Draft202012Validator(KEDA_SCHEMA)


def scaled_objects() -> list[dict]:
    found = [so for name in OVERLAYS for so in of_kind(overlay(name), "ScaledObject")]
    assert found, "no overlay renders a ScaledObject"
    return found


def test_keda_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(KEDA_SCHEMA)


@pytest.mark.parametrize("name", OVERLAYS)
def test_scaled_objects_match_the_keda_schema(name):
    for so in of_kind(overlay(name), "ScaledObject"):
        errors = sorted(KEDA_VALIDATOR.iter_errors(so), key=str)
        assert not errors, f"{so['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )


def test_keda_schema_rejects_what_the_scaler_would_silently_ignore():
    """The schema check can fail: misspelt keys and unknown fields are errors."""
    good = scaled_objects()[0]
    assert KEDA_VALIDATOR.is_valid(good)
    misspelt = copy.deepcopy(good)
    meta = misspelt["spec"]["triggers"][0]["metadata"]
    meta["consumerName"] = meta.pop("consumer")
    assert not KEDA_VALIDATOR.is_valid(misspelt)
    unknown = copy.deepcopy(good)
    unknown["spec"]["minReplicas"] = 1
    assert not KEDA_VALIDATOR.is_valid(unknown)
    numeric = copy.deepcopy(good)
    numeric["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5  # must be a string
    assert not KEDA_VALIDATOR.is_valid(numeric)


@pytest.mark.parametrize("name", OVERLAYS)
def test_scalers_read_the_consumers_their_service_uses(name):
    objects = overlay(name)
    consumers = {spec.durable: spec for spec in subjects.CONSUMERS}
    for so in of_kind(objects, "ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        find(objects, "Deployment", target)
        namespace = so["metadata"]["namespace"]
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            meta = trigger["metadata"]
            spec = consumers.get(meta["consumer"])
            assert spec is not None, f"{meta['consumer']} is not a consumer in shared/subjects.py"
            assert spec.durable.startswith(target + "-"), f"{target} scales on {spec.durable}"
            assert meta["stream"] == spec.stream
            # The headless Service in the ScaledObject's own namespace, monitoring port.
            assert meta["natsServerMonitoringEndpoint"] == f"nats-headless.{namespace}.svc.cluster.local:8222"
            assert meta["account"] == "SEAL"  # the services' account in nats.conf
    if name == "prod":
        scaled = {t["metadata"]["consumer"] for so in of_kind(objects, "ScaledObject") for t in so["spec"]["triggers"]}
        assert {"generator-feedback", "trainer-selfedits", "evaluator-adapters"} <= scaled


def renamed_prod(tmp_path, namespace: str) -> list[dict]:
    """An overlay of one's own over k8s/overlays/prod that sets another namespace, as
    docs/kubernetes.md (8. Namespace) says to write it."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: {namespace}\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'prod', tmp_path)}\n"
        f"transformers:\n  - {os.path.relpath(K8S / 'components' / 'keda-autoscaling' / 'namespace', tmp_path)}\n"
    )
    return render_directory(tmp_path)


def test_keda_endpoint_follows_a_renamed_namespace(tmp_path):
    """An overlay over prod with another namespace keeps KEDA pointed at its own NATS, not at
    the NATS of namespace seal (which may be another team's platform, or nothing)."""
    objects = renamed_prod(tmp_path, "seal-team")
    (namespace,) = of_kind(objects, "Namespace")
    assert namespace["metadata"]["name"] == "seal-team"
    scaled = of_kind(objects, "ScaledObject")
    assert {so["metadata"]["name"] for so in scaled} == {"generator", "trainer", "evaluator"}
    for so in scaled:
        assert so["metadata"]["namespace"] == "seal-team"
        for trigger in so["spec"]["triggers"]:
            assert trigger["metadata"]["natsServerMonitoringEndpoint"] == "nats-headless.seal-team.svc.cluster.local:8222", (
                so["metadata"]["name"],
                trigger["name"],
            )


def test_the_keda_component_leaves_the_namespace_to_the_transformer():
    """The component cannot know the final namespace (it runs before `namespace:`): it keeps a
    placeholder, and every overlay that uses it lists the transformer that fills it in."""
    component = yaml.safe_load((K8S / "components" / "keda-autoscaling" / "kustomization.yaml").read_text())
    assert "replacements" not in component
    transformer = "../../components/keda-autoscaling/namespace"
    for name in OVERLAYS:
        doc = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
        if any(c.endswith("components/keda-autoscaling") for c in doc.get("components", [])):
            assert transformer in doc.get("transformers", []), f"overlays/{name} uses KEDA without {transformer}"
    for so in scaled_objects():
        for trigger in so["spec"]["triggers"]:
            assert "NAMESPACE" not in trigger["metadata"]["natsServerMonitoringEndpoint"]


def test_kustomizations_parse_and_reference_existing_files():
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        for key in ("resources", "components", "transformers"):
            for entry in doc.get(key, []):
                assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"
