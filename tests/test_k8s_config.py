"""Configuration, secrets and the infrastructure configs of the k8s manifests.

* Every key of the seal-config ConfigMap is a setting the services read, with a
  value that parses (a misspelt key would be ignored silently otherwise).
* No Secret is committed; the pods reference seal-secrets, and the settings read
  its keys from a Kubernetes-style secret volume (..data symlinks and all).
* The rendered nats.conf is valid for nats-server; run for real, it enables
  JetStream behind the user/password from the Secret, the provisioning init
  container's script creates every stream, KV bucket and the adapter bucket, and
  the monitoring endpoint shows a consumer's lag where KEDA looks for it. The
  products' user may submit feedback, call the registry and read outcomes, and
  nothing else (no services' events, no KV, no JetStream API, no _INBOX.>).
* NATS and MinIO take their user names as literals equal to the services'
  settings, so a seal-config change rolls the services and not them.
* The trainer's model device matches the GPU it asks for, and the image with it;
  dev's Deployments roll without a surge pod.
* The collector's config matches its Service and probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import yaml
from k8s_render import (
    K8S,
    OVERLAYS,
    SERVICES,
    config_map,
    find,
    main_container,
    of_kind,
    overlay,
    render_directory,
    tool,
    workloads,
)

from seal.stack import free_port
from shared import events as ev
from shared import subjects
from shared.settings import ServiceSettings
from shared.store import AdapterStore

SECRET_NAME = "seal-secrets"
TOKENS_SECRET = "seal-registry-tokens"  # the registry's API tokens, mounted by the registry alone
SECRET_KEYS = {"nats__password", "nats_product_password", "store__secret_key"}
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


def service_settings_classes() -> list[type[ServiceSettings]]:
    found: list[type[ServiceSettings]] = [ServiceSettings]
    for service in SERVICES:
        try:
            module = importlib.import_module(f"services.{service}.settings")
        except ModuleNotFoundError:
            continue
        found += [v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings]
    return found


def test_settings_read_the_secret_keys_from_a_kubernetes_secret_volume(monkeypatch, tmp_path):
    """Every service mounts all of seal-secrets: each reads its keys and lets the others be (the
    products' NATS password is NATS's alone; a `nats__` key the settings lack would stop them)."""
    for key in list(os.environ):
        if key.startswith("SEAL_"):
            monkeypatch.delenv(key)
    values = {"nats__password": "n-pass", "nats_product_password": "p-pass", "store__secret_key": "s-key"}
    assert set(values) == SECRET_KEYS
    mounted = secret_volume(tmp_path / "seal", values)
    for settings_cls in service_settings_classes():
        settings = settings_cls(_secrets_dir=str(mounted))
        assert settings.nats.password.get_secret_value() == "n-pass", settings_cls
        assert settings.store.secret_key.get_secret_value() == "s-key", settings_cls


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


def literal_env(workload: dict, container: str, var: str) -> str:
    """The literal value of one environment variable of a workload's container."""
    [found] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == container]
    [value] = [e["value"] for e in found.get("env", []) if e["name"] == var]
    return value


def nats_env(password: str = "not-a-real-password", name: str = "dev",
             product_password: str = "not-a-real-product-password") -> dict[str, str]:
    """The NATS container's environment as the overlay's StatefulSet and the Secret give it."""
    user = literal_env(find(overlay(name), "StatefulSet", "nats"), "nats", "NATS_USER")
    return {**os.environ, "POD_NAME": "nats-0", "NATS_USER": user, "NATS_PASSWORD": password,
            "NATS_PRODUCT_PASSWORD": product_password, "NATS_MAX_FILE_STORE": nats_store_env(name)}


@pytest.mark.parametrize("name", OVERLAYS)
def test_nats_and_minio_users_are_the_services_settings(name):
    """NATS and MinIO get their user names as literals (not from seal-config, whose hashed name
    would restart them on any settings change): they must be the ones the services log in as."""
    objects = overlay(name)
    settings = config_map(objects, "seal-config")["data"]
    assert literal_env(find(objects, "StatefulSet", "nats"), "nats", "NATS_USER") == settings["SEAL_NATS__USER"]
    assert literal_env(find(objects, "StatefulSet", "minio"), "minio", "MINIO_ROOT_USER") == settings["SEAL_STORE__ACCESS_KEY"]


def test_a_settings_change_rolls_the_services_not_nats_or_minio(tmp_path):
    """Change only SEAL_LOG_LEVEL over dev: the services' pod templates change (seal-config's new
    hash), the StatefulSets of NATS and MinIO stay exactly as they were."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'dev', tmp_path)}\n"
        "configMapGenerator:\n  - name: seal-config\n    behavior: merge\n    literals:\n"
        "      - SEAL_LOG_LEVEL=WARNING\n"
    )
    before, after = overlay("dev"), render_directory(tmp_path)
    assert config_map(after, "seal-config")["metadata"]["name"] != config_map(before, "seal-config")["metadata"]["name"]
    for service in SERVICES:
        assert find(after, "Deployment", service)["spec"]["template"] != find(before, "Deployment", service)["spec"]["template"]
    for infra in ("nats", "minio"):
        assert find(after, "StatefulSet", infra) == find(before, "StatefulSet", infra), f"{infra} would restart"


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


@pytest.mark.parametrize("missing", ["NATS_PASSWORD", "NATS_PRODUCT_PASSWORD"])
def test_nats_config_check_can_fail(tmp_path, missing):
    (tmp_path / "nats.conf").write_text(nats_files("dev")["nats.conf"])
    (tmp_path / "cluster.conf").write_text("")
    env = nats_env()
    del env[missing]  # the Secret, or its key, is missing
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


@dataclass
class RenderedNats:
    url: str
    monitor_port: int
    password: str  # the services' user's (nats__password)
    product_password: str  # the product user's (nats_product_password)


@contextlib.contextmanager
def rendered_nats(tmp_path: Path, edit: Callable[[str], str] | None = None) -> Iterator[RenderedNats]:
    """dev's rendered nats.conf run by a real nats-server, on free ports and a temporary store."""
    files = nats_files("dev")
    client_port, monitor_port = free_port(), free_port()
    conf = edit(files["nats.conf"]) if edit else files["nats.conf"]
    conf = replace_once(conf, "port: 4222", f"port: {client_port}")
    conf = replace_once(conf, "http_port: 8222", f"http_port: {monitor_port}")
    conf = replace_once(conf, "store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    conf = replace_once(conf, "pid_file: /var/run/nats/nats.pid", f"pid_file: {tmp_path / 'nats.pid'}")
    (tmp_path / "nats.conf").write_text(conf)
    (tmp_path / "cluster.conf").write_text(files["cluster.conf"])
    running = RenderedNats(f"nats://127.0.0.1:{client_port}", monitor_port, uuid.uuid4().hex, uuid.uuid4().hex)
    server = subprocess.Popen(
        [tool("nats-server"), "-c", str(tmp_path / "nats.conf")],
        env=nats_env(running.password, product_password=running.product_password),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The startup probe's endpoint: green once JetStream is up.
        wait_http(f"http://127.0.0.1:{monitor_port}/healthz")
        yield running
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.servers
async def test_rendered_nats_runs_jetstream_behind_the_secret_and_provisioning_works(stack, tmp_path, monkeypatch):
    with rendered_nats(tmp_path) as running:
        data = config_map(overlay("dev"), "seal-config")["data"]
        store = stack.store_settings()
        bucket = f"k8s-{uuid.uuid4().hex[:12]}"
        for key in list(os.environ):
            if key.startswith("SEAL_"):
                monkeypatch.delenv(key)
        for key, value in data.items():  # as the pods get them: the user, the streams' limits within dev's store
            if key.startswith("SEAL_NATS__"):
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("SEAL_NATS__URL", running.url)
        monkeypatch.setenv("SEAL_STORE__ENDPOINT", store.endpoint)
        monkeypatch.setenv("SEAL_STORE__ACCESS_KEY", store.access_key)
        monkeypatch.setenv("SEAL_STORE__BUCKET", bucket)
        secrets = secret_volume(
            tmp_path / "secrets",
            {"nats__password": running.password, "nats_product_password": running.product_password,
             "store__secret_key": store.secret_key.get_secret_value()},
        )
        settings = ServiceSettings(_secrets_dir=str(secrets))
        provision = load_provision_script()
        await asyncio.to_thread(provision.provision, settings, 1, 0.0)

        assert await asyncio.to_thread(AdapterStore.from_settings(settings.store).client.bucket_exists, bucket)
        with pytest.raises(Exception):
            await nats.connect(running.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
        nc = await nats.connect(running.url, user=data["SEAL_NATS__USER"], password=running.password)
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
        # In the NATS account prod's ScaledObjects name (the services', not the global one).
        (keda_account,) = {trigger["metadata"]["account"] for so in of_kind(overlay("prod"), "ScaledObject")
                           for trigger in so["spec"]["triggers"]}
        jsz = json.loads(
            wait_http(f"http://127.0.0.1:{running.monitor_port}/jsz?acc={keda_account}&consumers=true&config=true")
        )
        (account,) = [a for a in jsz["account_details"] if a["name"] == keda_account]
        (events,) = [s for s in account["stream_detail"] if s["name"] == spec.stream]
        (consumer,) = [c for c in events["consumer_detail"] if c["name"] == spec.durable]
        assert consumer["num_pending"] + consumer["num_ack_pending"] == 3


PRODUCT_USER = "product"
# What the product user may do, and what it must not.
PRODUCT_MAY = {"submit_feedback": True, "call_registry": True, "follow_outcomes": True,
               "forge_event": False, "write_kv": False, "jetstream_api": False, "read_services_inbox": False,
               "reflect_into_kv": False, "reflect_into_events": False}


async def flushed(nc) -> None:
    """Everything the connection sent so far has reached the server. nats-py's flush() writes its
    PING straight to the socket, ahead of what still waits for its flusher task (a SUB, a PUB),
    so one flush may return before the server saw them (1 run in 20 here); the second PING
    follows them."""
    await nc.flush()
    await nc.flush()


async def what_a_product_can_do(running: RenderedNats) -> tuple[dict[str, bool], list[str]]:
    """Each thing a product might try on the bus, tried with the product user, and what landed
    checked with the services' user. Also the errors NATS reported to the product."""
    services = await nats.connect(running.url, user="seal", password=running.password)
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    product = await nats.connect(running.url, user=PRODUCT_USER, password=running.product_password,
                                 error_cb=on_error, allow_reconnect=False)
    can: dict[str, bool] = {}
    try:
        js, product_js = services.jetstream(), product.jetstream(timeout=1)
        events = subjects.STREAMS[0]
        await js.add_stream(name=events.name, subjects=list(events.subjects))
        kv = await js.create_key_value(bucket=subjects.KV_REGISTRY)

        # The registry's request-reply (its API tokens decide the role there); any answer will do.
        async def answer(msg) -> None:
            await msg.respond(b'{"ok": false, "status": 401}')

        await services.subscribe(f"{subjects.REGISTRY_RPC}.>", cb=answer)
        await flushed(services)

        async def settled() -> None:
            """Whatever the product sent before has been stored, or refused, by now: the services'
            acknowledged writes queue behind it in the same streams."""
            await flushed(product)
            await js.publish(f"{subjects.EVENTS_PREFIX}.k8s.marker", b"{}")
            await kv.put("k8s-marker", b"{}")

        async def landed_in_events(subject: str) -> bool:
            try:
                await js.get_last_msg(events.name, subject)
                return True
            except nats.js.errors.NotFoundError:
                return False

        async def landed_in_kv(key: str) -> bool:
            try:
                await kv.get(key)
                return True
            except nats.js.errors.KeyNotFoundError:
                return False

        # Feedback, as docs/feedback.md says: a JetStream publish, acknowledged, deduplicated.
        feedback, msg_id = json.dumps({"k8s-test": uuid.uuid4().hex}).encode(), uuid.uuid4().hex
        try:
            ack = await product_js.publish(subjects.FEEDBACK_SUBMITTED, feedback, headers={"Nats-Msg-Id": msg_id})
            again = await product_js.publish(subjects.FEEDBACK_SUBMITTED, feedback, headers={"Nats-Msg-Id": msg_id})
            stored = await js.get_last_msg(events.name, subjects.FEEDBACK_SUBMITTED)
            can["submit_feedback"] = (ack.stream == events.name and stored.data == feedback
                                      and bool(again.duplicate) and again.seq == ack.seq)
        except nats.errors.TimeoutError:
            can["submit_feedback"] = False

        try:
            reply = await product.request(f"{subjects.REGISTRY_RPC}.scopes", b"{}", timeout=2)
            can["call_registry"] = json.loads(reply.data)["status"] == 401
        except nats.errors.TimeoutError:
            can["call_registry"] = False

        # A services' event (that an adapter passed its evaluation), and the registry's state
        # written as kv.put does (a publish to $KV.<bucket>.<key>).
        await product.publish(subjects.ADAPTER_EVALUATED, b'{"forged": true}')
        await product.publish(f"$KV.{subjects.KV_REGISTRY}.forged", b'{"forged": true}')
        # The same targets named as the reply subject of an allowed publish and of a registry
        # request: whoever answers (JetStream's acknowledgement, the registry) writes there.
        for allowed in (subjects.FEEDBACK_SUBMITTED, f"{subjects.REGISTRY_RPC}.scopes"):
            await product.publish(allowed, b"{}", reply=subjects.ADAPTER_REJECTED)
            await product.publish(allowed, b"{}", reply=f"$KV.{subjects.KV_REGISTRY}.reflected")
        await settled()
        await asyncio.sleep(0.2)  # the registry's answers, published from its callback
        await settled()
        can["forge_event"] = await landed_in_events(subjects.ADAPTER_EVALUATED)
        can["write_kv"] = await landed_in_kv("forged")
        can["reflect_into_events"] = await landed_in_events(subjects.ADAPTER_REJECTED)
        can["reflect_into_kv"] = await landed_in_kv("reflected")

        # The JetStream API: stream info, a bucket (and from there deleting streams, reading KV).
        try:
            await product_js.stream_info(events.name)
            await product_js.key_value(subjects.KV_REGISTRY)
            can["jetstream_api"] = True
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            can["jetstream_api"] = False

        # The services' inboxes, where their JetStream and KV replies travel.
        snooping = await product.subscribe("_INBOX.>")
        await flushed(product)
        await js.stream_info(events.name)
        await kv.get("k8s-marker")
        try:
            while True:
                msg = await snooping.next_msg(timeout=1)
                if not msg.subject.startswith(product._resp_sub_prefix.decode()):  # not its own
                    can["read_services_inbox"] = True
                    break
        except nats.errors.TimeoutError:
            can["read_services_inbox"] = False

        # What became of feedback: the decision events, read as they are published.
        decided = subjects.subject_for(ev.FeedbackDecided)
        following = await product.subscribe(decided)
        await flushed(product)
        await js.publish(decided, b"{}")
        try:
            can["follow_outcomes"] = (await following.next_msg(timeout=2)).subject == decided
        except nats.errors.TimeoutError:
            can["follow_outcomes"] = False
    finally:
        await product.close()
        await services.close()
    return can, errors


@pytest.mark.servers
async def test_rendered_nats_keeps_products_to_feedback(tmp_path):
    """The products' user (nats_product_password) submits feedback with a JetStream publish,
    calls the registry and reads decisions; it cannot forge the services' events, write the
    registry's KV (directly, or as the reply subject of what it may send), use the JetStream
    API or read the services' replies."""
    with rendered_nats(tmp_path) as running:
        can, errors = await what_a_product_can_do(running)
    assert can == PRODUCT_MAY
    # NATS told the product why (nats-py passes the server's -ERR to error_cb, in lower case).
    assert f'permissions violation for publish to "{subjects.ADAPTER_EVALUATED}"' in " ".join(errors).lower(), errors


def block(conf: str, opening: str) -> tuple[int, int]:
    """Where the block that begins with `opening` (ending in "{") starts and ends, braces counted."""
    start = conf.index(opening)
    depth = 0
    for end in range(start + len(opening) - 1, len(conf)):
        depth += {"{": 1, "}": -1}.get(conf[end], 0)
        if depth == 0:
            return start, end + 1
    raise AssertionError(f"{opening!r} is not closed")


def one_account(conf: str, permissions: bool) -> str:
    """nats.conf with both users in one account (NATS's global one), the product user with the
    rendered permissions or none: users and permissions without separate accounts."""
    start, end = block(conf, "permissions: {")
    allowed = conf[start:end] if permissions else ""
    users = ("authorization {\n  users: [\n    {user: $NATS_USER, password: $NATS_PASSWORD}\n"
             f"    {{user: {PRODUCT_USER}, password: $NATS_PRODUCT_PASSWORD, {allowed}}}\n  ]\n}}\n")
    start, end = block(conf, "accounts {")
    return conf[:start] + users + conf[end:]


@pytest.mark.servers
@pytest.mark.parametrize("permissions", [True, False], ids=["permissions-only", "no-permissions"])
async def test_product_check_can_fail(tmp_path, permissions):
    """With both users in one account the check above fails: permissions alone leave the reply
    subject open (and _INBOX.> the services' own); without them the product may do anything."""
    with rendered_nats(tmp_path, lambda conf: one_account(conf, permissions)) as running:
        can, _ = await what_a_product_can_do(running)
    got_in = {key for key, value in can.items() if value and not PRODUCT_MAY[key]}
    if permissions:
        assert got_in == {"reflect_into_kv", "reflect_into_events", "read_services_inbox"}
    else:
        assert got_in == {key for key, value in PRODUCT_MAY.items() if not value}


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


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def env_value(container: dict, var: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == var), None)


def assert_models_on_what_they_ask_for(objects: list[dict], where: str) -> None:
    """The trainer and evaluator run their model on the GPU exactly when they ask for one
    (SEAL_MODEL__DEVICE cuda, not "auto", which would fall back to the CPU unseen), from the CUDA
    image then and from the -cpu image otherwise."""
    for service in ("trainer", "evaluator"):
        container = main_container(find(objects, "Deployment", service))
        on_gpu = gpus(container) > 0
        assert env_value(container, "SEAL_MODEL__DEVICE") == ("cuda" if on_gpu else "cpu"), (where, service)
        assert container["image"].endswith("-cpu") != on_gpu, (where, service, container["image"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_models_run_on_the_device_they_ask_for(name):
    assert_models_on_what_they_ask_for(overlay(name), name)
    expected = {"dev": "cpu", "prod": "cuda"}  # dev has no GPU; prod trains on one
    if name in expected:
        trainer = main_container(find(overlay(name), "Deployment", "trainer"))
        assert env_value(trainer, "SEAL_MODEL__DEVICE") == expected[name]
    # In float32 on a GPU too, as every benchmark ran ("auto" would train in bfloat16 there).
    config = next(o for o in overlay(name) if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("seal-config"))
    import torch

    from shared.models import resolve_dtype

    assert resolve_dtype(config["data"]["SEAL_MODEL__DTYPE"], torch.device("cuda")) == torch.float32


def test_evaluator_gpu_over_prod_as_the_docs_say(tmp_path):
    """components/evaluator-gpu over prod, with the CUDA tag set beside it as docs/kubernetes.md
    (2) shows; without that tag the check above notices the -cpu image on a GPU."""
    prod, gpu = os.path.relpath(K8S / "overlays" / "prod", tmp_path), os.path.relpath(K8S / "components" / "evaluator-gpu", tmp_path)
    head = f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {prod}\ncomponents:\n  - {gpu}\n"
    (tmp_path / "kustomization.yaml").write_text(head)
    with pytest.raises(AssertionError):
        assert_models_on_what_they_ask_for(render_directory(tmp_path), "prod + evaluator-gpu, -cpu image")
    images = "images:\n  - name: registry.example.com/seal/evaluator\n    newTag: 0.1.0\n"
    docs = (K8S.parent / "docs" / "kubernetes.md").read_text()
    assert "- name: registry.example.com/seal/evaluator\n    newTag: 0.1.0\n" in docs
    (tmp_path / "kustomization.yaml").write_text(head + images)
    assert_models_on_what_they_ask_for(render_directory(tmp_path), "prod + evaluator-gpu")


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_dev_rolls_out_on_a_four_cpu_machine():
    """dev's CPU requests fit a 4-CPU machine beside Kubernetes' own pods (about 1 CPU on kind:
    the API server, etcd, the controller manager, the scheduler, CoreDNS, the CNI), and no
    Deployment surges: a surge pod that does not fit waits in Pending and the rollout never ends."""
    objects = overlay("dev")
    requested = 0.0
    for workload in workloads(objects):
        spec = workload["spec"]
        pod = spec["template"]["spec"]
        main = sum(cpu(c.get("resources", {}).get("requests", {}).get("cpu", "0")) for c in pod["containers"])
        init = max((cpu(c.get("resources", {}).get("requests", {}).get("cpu", "0")) for c in pod.get("initContainers", [])), default=0.0)
        requested += spec.get("replicas", 1) * max(main, init)
        if workload["kind"] == "Deployment":
            strategy = spec.get("strategy", {})
            assert strategy.get("type") == "Recreate" or strategy.get("rollingUpdate", {}).get("maxSurge") == 0, \
                f"{workload['metadata']['name']} surges in dev: {strategy}"
    assert requested <= 4 - 1, f"dev requests {requested} CPUs"
