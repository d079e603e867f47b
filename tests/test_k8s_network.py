"""prod's NetworkPolicies: each service reaches only NATS, object storage and the collector.

A small evaluator of NetworkPolicy semantics over the rendered objects: which
policies select a pod, which pods and ports their rules admit. Egress from the
services is checked against the settings they actually use (SEAL_NATS__URL,
SEAL_STORE__ENDPOINT, SEAL_TELEMETRY__OTLP_ENDPOINT), and every allowed egress
must also be admitted by the receiving pod's ingress policy.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from k8s_render import K8S, SERVICES, config_map, find, of_kind, overlay, pod_labels, selects, workloads

DNS = "kube-dns"


@pytest.fixture(scope="module")
def objects():
    return overlay("prod")


def policies_for(objects, labels: dict, policy_type: str) -> list[dict]:
    return [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if policy_type in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], labels)
    ]


def peer_targets(objects, peer: dict) -> set[str]:
    """Workload names (or 'kube-dns', or 'outside') a NetworkPolicy peer admits."""
    if "ipBlock" in peer:
        return {"outside"}
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"].get("matchLabels", {})
        if ns == {"kubernetes.io/metadata.name": "kube-system"} and peer.get("podSelector", {}).get("matchLabels") == {
            "k8s-app": "kube-dns"
        }:
            return {DNS}
        return {"outside"}
    return {w["metadata"]["name"] for w in workloads(objects) if selects(peer["podSelector"], pod_labels(w))}


def rule_ports(rule: dict) -> set[int | str]:
    ports = rule.get("ports")
    if not ports:
        return {"any"}
    return {p.get("port", "any") for p in ports}


def egress(objects, labels: dict) -> set[tuple[str, int | str]]:
    allowed = set()
    for policy in policies_for(objects, labels, "Egress"):
        for rule in policy["spec"].get("egress", []):
            targets = set().union(*(peer_targets(objects, peer) for peer in rule["to"])) if rule.get("to") else {"anywhere"}
            allowed |= {(t, port) for t in targets for port in rule_ports(rule)}
    return allowed


def ingress_admits(objects, source_labels: dict, target: str, port: int) -> bool:
    target_labels = pod_labels(next(w for w in workloads(objects) if w["metadata"]["name"] == target))
    policies = policies_for(objects, target_labels, "Ingress")
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if port not in rule_ports(rule) and "any" not in rule_ports(rule):
                continue
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer and peer["namespaceSelector"] != {}:
                    continue
                if selects(peer.get("podSelector", {}), source_labels):
                    return True
    return False


def endpoint(objects, host: str, port: int) -> tuple[str, int]:
    """(workload, container port) behind Service host:port."""
    service = find(objects, "Service", host)
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    (workload,) = [w for w in workloads(objects) if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))]
    container_ports = {p["name"]: p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    target = svc_port["targetPort"]
    return workload["metadata"]["name"], container_ports.get(target, target)


def used_endpoints(objects) -> set[tuple[str, int]]:
    settings = config_map(objects, "seal-config")["data"]
    nats = urlsplit(settings["SEAL_NATS__URL"])
    store_host, store_port = settings["SEAL_STORE__ENDPOINT"].rsplit(":", 1)
    otlp = urlsplit(settings["SEAL_TELEMETRY__OTLP_ENDPOINT"])
    return {
        endpoint(objects, nats.hostname, nats.port),
        endpoint(objects, store_host, int(store_port)),
        endpoint(objects, otlp.hostname, otlp.port),
    }


def test_default_deny_for_every_pod(objects):
    deny = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny


@pytest.mark.parametrize("service", SERVICES)
def test_service_reaches_only_nats_object_storage_and_the_collector(objects, service):
    labels = pod_labels(find(objects, "Deployment", service))
    allowed = egress(objects, labels)
    needed = used_endpoints(objects)
    assert {name for name, _ in needed} == {"nats", "minio", "otel-collector"}
    assert needed <= allowed, f"{service} cannot reach {needed - allowed}"
    permitted = needed | {("otel-collector", 4317), (DNS, 53)}
    assert allowed <= permitted, f"{service} may also reach {allowed - permitted}"


@pytest.mark.parametrize("service", SERVICES)
def test_what_a_service_may_send_the_receiver_accepts(objects, service):
    labels = pod_labels(find(objects, "Deployment", service))
    for target, port in egress(objects, labels):
        if target == DNS:
            continue
        assert ingress_admits(objects, labels, target, port), f"{service} -> {target}:{port} is dropped on arrival"


def test_object_storage_and_collector_accept_only_the_services(objects):
    for target, ports in (("minio", {9000}), ("otel-collector", {4317, 4318})):
        labels = pod_labels(next(w for w in workloads(objects) if w["metadata"]["name"] == target))
        for policy in policies_for(objects, labels, "Ingress"):
            for rule in policy["spec"].get("ingress", []):
                assert rule_ports(rule) <= ports, f"{target} opens {rule_ports(rule)}"
                for peer in rule["from"]:
                    assert peer_targets(objects, peer) <= set(SERVICES), f"{target} admits {peer}"


def test_keda_and_clients_reach_nats(objects):
    nats_labels = pod_labels(find(objects, "StatefulSet", "nats"))
    rules = [r for p in policies_for(objects, nats_labels, "Ingress") for r in p["spec"].get("ingress", [])]
    monitoring = [r for r in rules if 8222 in rule_ports(r)]
    assert any(
        peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "keda"}
        for r in monitoring
        for peer in r["from"]
    ), "KEDA's operator cannot read NATS monitoring"
    clients = [r for r in rules if 4222 in rule_ports(r)]
    assert any(peer.get("podSelector", {}).get("matchLabels") == {"seal.io/nats-client": "true"} for r in clients for peer in r["from"])
    # Cluster routes between the NATS servers, both ways.
    assert ("nats", 6222) in egress(objects, nats_labels)
    assert ingress_admits(objects, nats_labels, "nats", 6222)


REGISTRY_CLIENT = {"seal.io/registry-client": "true"}
REGISTRY_ACCESS = {"seal.io/registry-access": "true"}


def registry_peers(objects) -> list[dict]:
    labels = pod_labels(find(objects, "Deployment", "registry"))
    peers = []
    for policy in policies_for(objects, labels, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            assert rule_ports(rule) == {8080}, f"the registry opens {rule_ports(rule)}"
            assert rule.get("from"), "an ingress rule without sources admits every pod in the cluster"
            peers += rule["from"]
    return peers


def admits_from(peer: dict, pod: dict, namespace: dict | None) -> bool:
    """Whether a peer admits a pod with these labels from a namespace with these labels
    (None: the policy's own namespace)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {} if namespace is None else namespace):
            return False
    elif namespace is not None:
        return False
    return selects(peer.get("podSelector", {}), pod)


def registry_admits(objects, pod: dict, namespace: dict | None) -> bool:
    return any(admits_from(peer, pod, namespace) for peer in registry_peers(objects))


def test_registry_api_admits_clients_only_from_approved_namespaces(objects):
    """The registry's API has no authentication: the policy is what keeps an arbitrary pod in
    an arbitrary namespace from promoting, rolling back or replaying."""
    for peer in registry_peers(objects):
        assert peer.get("podSelector", {}).get("matchLabels") == REGISTRY_CLIENT, peer
        if "namespaceSelector" in peer:
            assert peer["namespaceSelector"] == {"matchLabels": REGISTRY_ACCESS}, peer
    # own namespace and approved namespaces: labelled pods only
    assert registry_admits(objects, REGISTRY_CLIENT, None)
    assert registry_admits(objects, REGISTRY_CLIENT, {"kubernetes.io/metadata.name": "ops", **REGISTRY_ACCESS})
    assert not registry_admits(objects, {}, None)
    assert not registry_admits(objects, {}, REGISTRY_ACCESS)
    # any other namespace: not even with the pod label
    assert not registry_admits(objects, REGISTRY_CLIENT, {"kubernetes.io/metadata.name": "product-team"})
    assert not registry_admits(objects, REGISTRY_CLIENT, {})


def test_registry_check_can_fail(objects):
    """The check above notices a namespaceSelector that matches every namespace."""
    policy = next(p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "registry-api-ingress")
    any_namespace = {"namespaceSelector": {}, "podSelector": {"matchLabels": REGISTRY_CLIENT}}
    rule = {"from": [any_namespace], "ports": [{"protocol": "TCP", "port": 8080}]}
    loose = {**policy, "metadata": {"name": "loose"}, "spec": {**policy["spec"], "ingress": [rule]}}
    assert registry_admits([*objects, loose], REGISTRY_CLIENT, {"kubernetes.io/metadata.name": "product-team"})


def test_registry_access_labels_are_documented(objects):
    docs = (K8S.parent / "docs" / "kubernetes.md").read_text()
    for label in (*REGISTRY_CLIENT, *REGISTRY_ACCESS):
        assert f"`{label}" in docs, f"docs/kubernetes.md does not say how to use {label}"


def test_every_pod_may_resolve_names(objects):
    for workload in workloads(objects):
        assert (DNS, 53) in egress(objects, pod_labels(workload)), workload["metadata"]["name"]


def test_evaluator_can_fail():
    """The evaluator above notices an egress rule without destinations (allow-all)."""
    objects = overlay("prod")
    open_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "oops"},
        "spec": {"podSelector": {"matchLabels": {"seal.io/role": "service"}}, "policyTypes": ["Egress"], "egress": [{}]},
    }
    labels = pod_labels(find(objects, "Deployment", "trainer"))
    assert ("anywhere", "any") in egress([*objects, open_policy], labels)
