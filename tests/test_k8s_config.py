"""Configuration, secrets and the infrastructure configs of the k8s manifests.

* Every key of the seal-config ConfigMap is a setting the services read, with a
  value that parses (a misspelt key would be ignored silently otherwise).
* No Secret is committed; the pods reference seal-secrets, and the settings read
  its keys from a Kubernetes-style secret volume (..data symlinks and all).
* The rendered nats.conf is valid for nats-server; run for real, it enables
  JetStream behind the user/password from the Secret, the provisioning init
  container's script creates every stream, KV bucket and the adapter bucket, and
  the monitoring endpoint shows a consumer's lag where KEDA looks for it.
* The collector's config matches its Service and probes.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import nats
import pytest
import yaml
from k8s_render import K8S, OVERLAYS, SERVICES, config_map, find, main_container, of_kind, overlay, tool, workloads

from seal.stack import free_port
from shared import subjects
from shared.settings import ServiceSettings
from shared.store import AdapterStore

SECRET_NAME = "seal-secrets"
TOKENS_SECRET = "seal-registry-tokens"  # the registry's API tokens, mounted by the registry alone
SECRET_KEYS = {"nats__password", "store__secret_key"}
# Keys in seal-config that are not SEAL_ settings but read by libraries in the images.
LIBRARY_KEYS = {"HF_HOME"}


def secret_volume(directory: Path, values: dict[str, str]) -> Path:
    """A directory laid out as the kubelet mounts a Secret: files are symlinks through ..data."""
    stamp = directory / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, value in values.items():
        (stamp / key).write_text(value)
    (directory / "..data").symlink_to(stamp.name)
    for key in values:
        (directory / key).symlink_to(Path("..data") / key)
    return directory


def setting(settings: ServiceSettings, key: str):
    value = settings
    for part in key.removeprefix("SEAL_").lower().split("__"):
        assert hasattr(value, part), f"{key}: no setting {part!r}"
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", OVERLAYS)
def test_config_keys_are_settings_the_services_read(name, monkeypatch, tmp_path):
    data = config_map(overlay(name), "seal-config")["data"]
    for key in list(os.environ):
        if key.startswith("SEAL_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = ServiceSettings(_secrets_dir=str(tmp_path))
    for key, value in data.items():
        if key in LIBRARY_KEYS:
            continue
        assert key.startswith("SEAL_"), key
        actual = setting(settings, key)
        if isinstance(actual, bool):
            assert actual == (value.lower() == "true"), key
        elif isinstance(actual, float | int):
            assert actual == type(actual)(value), key
        else:
            assert str(actual) == value, key
    assert not any(word in key for key in data for word in ("PASSWORD", "SECRET", "TOKEN")), "secrets go in seal-secrets"


@pytest.mark.parametrize("service", SERVICES)
def test_per_service_env_keys_are_that_services_settings(service, monkeypatch, tmp_path):
    """SEAL_* variables set on one Deployment (e.g. SEAL_REGISTRY__ADAPTER_CACHE_DIR) exist in
    that service's own settings class."""
    try:
        module = importlib.import_module(f"services.{service}.settings")
    except ModuleNotFoundError:
        pytest.skip(f"services/{service}/settings.py does not exist yet")
    (settings_cls,) = [
        v for v in vars(module).values() if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings
    ]
    for key in list(os.environ):
        if key.startswith("SEAL_"):
            monkeypatch.delenv(key)
    container = main_container(find(overlay("prod"), "Deployment", service))
    literal = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("SEAL_") and "value" in e}
    for key, value in literal.items():
        monkeypatch.setenv(key, value)
    settings = settings_cls(_secrets_dir=str(tmp_path))
    for key, value in literal.items():
        assert str(setting(settings, key)) == value, key


def test_settings_read_the_secret_keys_from_a_kubernetes_secret_volume(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("SEAL_"):
            monkeypatch.delenv(key)
    mounted = secret_volume(tmp_path / "seal", {"nats__password": "n-pass", "store__secret_key": "s-key"})
    settings = ServiceSettings(_secrets_dir=str(mounted))
    assert settings.nats.password.get_secret_value() == "n-pass"
    assert settings.store.secret_key.get_secret_value() == "s-key"


def test_no_secret_is_committed():
    for path in K8S.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".env", ".conf"):
            text = path.read_text()
            assert not re.search(r"^kind:\s*Secret\s*$", text, re.M), path
            assert "secretGenerator" not in text, path
    for name in OVERLAYS:
        assert not of_kind(overlay(name), "Secret"), name


@pytest.mark.parametrize("name", OVERLAYS)
def test_secrets_are_referenced_by_name(name):
    objects = overlay(name)
    referenced_keys = set()
    for workload in workloads(objects):
        spec = workload["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] == SECRET_NAME
                assert "items" not in volume["secret"], "mount every key: the settings pick theirs by file name"
            for source in volume.get("projected", {}).get("sources", []):
                # seal-secrets itself, or (the registry's) its API tokens, which may not exist
                secret = source["secret"]
                assert secret["name"] == SECRET_NAME or (secret["name"] == TOKENS_SECRET and secret.get("optional") is True)
                assert "items" not in secret, "mount every key: the settings pick theirs by file name"
        for container in spec["containers"] + spec.get("initContainers", []):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME
                    referenced_keys.add(ref["key"])
                if re.search("PASSWORD|SECRET|TOKEN", env["name"]):
                    assert "value" not in env, f"{env['name']} has a literal value"
    assert referenced_keys <= SECRET_KEYS
    for service in SERVICES:
        deployment = find(objects, "Deployment", service)
        mounts = {m["mountPath"]: m for m in main_container(deployment)["volumeMounts"]}
        assert mounts["/run/secrets/seal"]["readOnly"] is True


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_registry_mounts_its_api_tokens(name):
    for workload in workloads(overlay(name)):
        sources = [source["secret"]["name"] for volume in workload["spec"]["template"]["spec"].get("volumes", [])
                   for source in volume.get("projected", {}).get("sources", []) if "secret" in source]
        assert (TOKENS_SECRET in sources) == (workload["metadata"]["name"] == "registry"), workload["metadata"]["name"]


def test_docs_say_how_to_create_the_secret():
    docs = (K8S.parent / "docs" / "kubernetes.md").read_text()
    assert re.search(rf"kubectl (-n \S+ )?create secret generic {SECRET_NAME}", docs)
    for key in SECRET_KEYS:
        assert key in docs
    assert re.search(rf"kubectl (-n \S+ )?create secret generic {TOKENS_SECRET}", docs) and "registry__api_tokens" in docs


def nats_files(name: str) -> dict[str, str]:
    objects = overlay(name)
    return next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("nats-config-"))["data"]


def nats_store_env(name: str) -> str:
    """NATS_MAX_FILE_STORE as the overlay's StatefulSet sets it (nats.conf reads it)."""
    nats_container = next(c for c in find(overlay(name), "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"]
                          if c["name"] == "nats")
    [value] = [e["value"] for e in nats_container["env"] if e["name"] == "NATS_MAX_FILE_STORE"]
    return value


def nats_env(password: str = "not-a-real-password", name: str = "dev") -> dict[str, str]:
    return {**os.environ, "POD_NAME": "nats-0", "NATS_USER": "seal", "NATS_PASSWORD": password,
            "NATS_MAX_FILE_STORE": nats_store_env(name)}


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([KMGT]i?B?|)", size.strip()).groups()  # type: ignore[union-attr]
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1]]
    return int(number) * (1024 if "i" in unit or unit.endswith("B") else 1000) ** power


@pytest.mark.parametrize("name", OVERLAYS)
def test_jetstream_keeps_within_its_volume_and_the_streams_within_jetstream(name):
    """A flood must not fill the NATS volume: JetStream's store is below the claim, and the
    events' and the dead letters' limits (the services' settings in that overlay) within the store."""
    objects = overlay(name)
    claim = find(objects, "StatefulSet", "nats")["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    store = _bytes(nats_store_env(name))
    settings = config_map(objects, "seal-config")["data"]
    from shared.settings import NatsSettings

    defaults = NatsSettings()
    events = int(settings.get("SEAL_NATS__EVENTS_MAX_BYTES", defaults.events_max_bytes))
    dead = int(settings.get("SEAL_NATS__DEAD_LETTERS_MAX_BYTES", defaults.dead_letters_max_bytes))
    assert events + dead < store < _bytes(claim), (name, events, dead, store, claim)


@pytest.mark.parametrize("name", OVERLAYS)
def test_nats_config_is_valid(name, tmp_path):
    for file, text in nats_files(name).items():
        (tmp_path / file).write_text(text)
    result = subprocess.run(
        [tool("nats-server"), "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        env=nats_env(name=name),
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_config_check_can_fail(tmp_path):
    (tmp_path / "nats.conf").write_text(nats_files("dev")["nats.conf"])
    (tmp_path / "cluster.conf").write_text("")
    env = nats_env()
    del env["NATS_PASSWORD"]  # the Secret is missing
    result = subprocess.run([tool("nats-server"), "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, env=env)
    assert result.returncode != 0


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected {old!r} once in nats.conf"
    return text.replace(old, new)


def load_provision_script():
    spec = importlib.util.spec_from_file_location("seal_k8s_provision", K8S / "base" / "provision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_http(url: str, timeout_s: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.servers
async def test_rendered_nats_runs_jetstream_behind_the_secret_and_provisioning_works(stack, tmp_path, monkeypatch):
    files = nats_files("dev")
    client_port, monitor_port = free_port(), free_port()
    conf = files["nats.conf"]
    conf = replace_once(conf, "port: 4222", f"port: {client_port}")
    conf = replace_once(conf, "http_port: 8222", f"http_port: {monitor_port}")
    conf = replace_once(conf, "store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    conf = replace_once(conf, "pid_file: /var/run/nats/nats.pid", f"pid_file: {tmp_path / 'nats.pid'}")
    (tmp_path / "nats.conf").write_text(conf)
    (tmp_path / "cluster.conf").write_text(files["cluster.conf"])
    password = uuid.uuid4().hex
    server = subprocess.Popen(
        [tool("nats-server"), "-c", str(tmp_path / "nats.conf")],
        env=nats_env(password),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The startup probe's endpoint: green once JetStream is up.
        wait_http(f"http://127.0.0.1:{monitor_port}/healthz")
        data = config_map(overlay("dev"), "seal-config")["data"]
        store = stack.store_settings()
        bucket = f"k8s-{uuid.uuid4().hex[:12]}"
        for key in list(os.environ):
            if key.startswith("SEAL_"):
                monkeypatch.delenv(key)
        for key, value in data.items():  # as the pods get them: the user, the streams' limits within dev's store
            if key.startswith("SEAL_NATS__"):
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("SEAL_NATS__URL", f"nats://127.0.0.1:{client_port}")
        monkeypatch.setenv("SEAL_STORE__ENDPOINT", store.endpoint)
        monkeypatch.setenv("SEAL_STORE__ACCESS_KEY", store.access_key)
        monkeypatch.setenv("SEAL_STORE__BUCKET", bucket)
        secrets = secret_volume(
            tmp_path / "secrets",
            {"nats__password": password, "store__secret_key": store.secret_key.get_secret_value()},
        )
        settings = ServiceSettings(_secrets_dir=str(secrets))
        provision = load_provision_script()
        await asyncio.to_thread(provision.provision, settings, 1, 0.0)

        assert await asyncio.to_thread(AdapterStore.from_settings(settings.store).client.bucket_exists, bucket)
        with pytest.raises(Exception):
            await nats.connect(f"nats://127.0.0.1:{client_port}", allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
        nc = await nats.connect(f"nats://127.0.0.1:{client_port}", user="seal", password=password)
        try:
            js = nc.jetstream()
            for stream in subjects.STREAMS:
                await js.stream_info(stream.name)
            for kv in subjects.KV_BUCKETS:
                await js.key_value(kv)
            # What KEDA's nats-jetstream scaler reads: pending + ack-pending of a durable consumer.
            spec = subjects.GENERATOR_FEEDBACK
            await js.pull_subscribe(spec.subject, durable=spec.durable, stream=spec.stream)
            for i in range(3):
                await js.publish(spec.subject, b"{}", headers={"Nats-Msg-Id": f"k8s-test-{i}"})
        finally:
            await nc.close()
        jsz = json.loads(
            wait_http(f"http://127.0.0.1:{monitor_port}/jsz?acc=$G&consumers=true&config=true")
        )
        (account,) = [a for a in jsz["account_details"] if a["name"] == "$G"]
        (events,) = [s for s in account["stream_detail"] if s["name"] == spec.stream]
        (consumer,) = [c for c in events["consumer_detail"] if c["name"] == spec.durable]
        assert consumer["num_pending"] + consumer["num_ack_pending"] == 3
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_collector_config_matches_its_service_and_probes():
    objects = overlay("prod")
    config = yaml.safe_load(config_map(objects, "otel-collector-config")["data"]["collector.yaml"])
    service_ports = {p["port"] for p in find(objects, "Service", "otel-collector")["spec"]["ports"]}
    protocols = config["receivers"]["otlp"]["protocols"]
    assert {int(p["endpoint"].rsplit(":", 1)[1]) for p in protocols.values()} == service_ports
    collector = main_container(find(objects, "Deployment", "otel-collector"))
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    health_port = int(config["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1])
    assert ports[collector["livenessProbe"]["httpGet"]["port"]] == health_port
    for pipeline in config["service"]["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline[section]:
                assert component in config[section], component
    assert config["service"]["extensions"] == ["health_check"]
    otlp = config_map(objects, "seal-config")["data"]["SEAL_TELEMETRY__OTLP_ENDPOINT"]
    assert otlp == "http://otel-collector:4318"
    mount = next(m for m in collector["volumeMounts"] if m["name"] == "config")
    assert collector["args"] == [f"--config={mount['mountPath']}/collector.yaml"]
