"""The four services as their pods run them: each a real process with its container's environment
from the rendered dev overlay, against the rendered nats.conf (its users and accounts) run by a
real nats-server, provisioned by the init container's script.

The manifests' other tests read the settings; this one starts what reads them. Until it existed
no service had ever been started with NATS credentials, and every service crashed at start in
Kubernetes (FastStream's NatsBroker refuses ``user=``/``password=``) for nineteen sessions.

What differs from a pod, and why: the addresses (this machine's servers on free ports, not
``nats:4222`` and ``minio:9000``), the volumes' paths (a temporary directory for each), the
secrets (given as environment variables: the Secret volume's layout is read by
``test_k8s_config.test_settings_read_the_secret_keys_from_a_kubernetes_secret_volume``), HTTP on
the loopback address (the pod's 0.0.0.0 without the registry's API tokens only warns), and the
tiny test model for ``default`` (loading four copies of the real one is what the demo measures).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from k8s_render import REPO, SERVICES, config_map, find, main_container, overlay
from test_k8s_config import RenderedNats, rendered_nats

from seal.stack import LocalStack, free_port
from seal.watch import FeedbackProgress, PlatformWatcher
from shared import events as ev
from shared import subjects
from shared.registry_view import ScopePolicy
from shared.settings import NatsSettings

pytestmark = [pytest.mark.servers, pytest.mark.slow]

MODEL_CACHE = Path(os.environ.get("SEAL_TEST_MODEL_CACHE", "~/.cache/seal/models")).expanduser()
POD_PATHS = "/var/cache/seal"  # every path the rendered settings name lies under a volume here


def cpu_cores(quantity: str) -> int:
    """A ``resourceFieldRef`` to ``limits.cpu`` as the kubelet resolves it (divisor 1): whole cores, rounded up."""
    cores = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, math.ceil(cores))


def pod_env(service: str, volumes: Path) -> dict[str, str]:
    """The environment of ``service``'s container in the rendered dev overlay: its ConfigMaps, then
    its own ``env`` (literals and its CPU limit), the volumes' paths moved under ``volumes``."""
    objects = overlay("dev")
    container = main_container(find(objects, "Deployment", service))
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(config_map(objects, name.rsplit("-", 1)[0])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        field = item["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu", f"{service}: {item} is resolved by no rule here"
        env[item["name"]] = str(cpu_cores(container["resources"]["limits"]["cpu"]))
    return {key: value.replace(POD_PATHS, str(volumes / service)) if value.startswith(POD_PATHS) else value
            for key, value in env.items()}


def here(env: dict[str, str], running: RenderedNats, stack: LocalStack, bucket: str) -> dict[str, str]:
    """The pod's environment pointed at this machine's servers, with the Secret's keys."""
    store = stack.store_settings()
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        **env,
        "SEAL_NATS__URL": running.url,
        "SEAL_NATS__PASSWORD": running.password,
        "SEAL_STORE__ENDPOINT": store.endpoint,
        "SEAL_STORE__SECRET_KEY": store.secret_key.get_secret_value(),
        "SEAL_STORE__BUCKET": bucket,
        "SEAL_TELEMETRY__OTLP_ENDPOINT": "",
        "SEAL_MODEL__NAME": "tiny",
        "SEAL_MODEL__CACHE_DIR": str(MODEL_CACHE),
        "SEAL_HTTP_HOST": "127.0.0.1",
        "SEAL_HTTP_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }


def answer(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def pods(stack: LocalStack, tmp_path: Path) -> Iterator[tuple[RenderedNats, dict[str, subprocess.Popen], dict[str, dict[str, str]], Path]]:
    (tmp_path / "nats").mkdir()
    with rendered_nats(tmp_path / "nats") as running:
        bucket = f"k8s-pods-{uuid.uuid4().hex[:10]}"
        envs = {name: here(pod_env(name, tmp_path / "volumes"), running, stack, bucket) for name in SERVICES}
        # The init container: streams, key-value buckets and the adapter bucket, with seal-config's settings.
        provision = subprocess.run([sys.executable, str(REPO / "k8s" / "base" / "provision.py")], env=envs["registry"],
                                   capture_output=True, text=True, timeout=120)
        assert provision.returncode == 0, provision.stdout + provision.stderr
        logs = tmp_path / "logs"
        logs.mkdir()
        procs: dict[str, subprocess.Popen] = {}
        try:
            for name in SERVICES:
                with (logs / f"{name}.log").open("wb") as out:
                    procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=envs[name], cwd=REPO,
                                                   stdout=out, stderr=subprocess.STDOUT)
            yield running, procs, envs, logs
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(60)
                if proc.poll() is None:
                    proc.kill()
            for name in procs:
                print(f"----- {name} log (tail) -----\n{(logs / f'{name}.log').read_text(errors='replace')[-3000:]}")


def wait_alive_and_ready(procs: dict[str, subprocess.Popen], envs: dict[str, dict[str, str]], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = set(procs)
    while waiting:
        for name in sorted(waiting):
            assert procs[name].poll() is None, f"{name} exited with {procs[name].returncode} (its log is printed below)"
            base = f"http://127.0.0.1:{envs[name]['SEAL_HTTP_PORT']}"
            if answer(f"{base}/readyz") == 200 and answer(f"{base}/healthz") in (200, 204):
                waiting.discard(name)
        assert time.monotonic() < deadline, f"not alive and ready after {timeout_s:g} s: {sorted(waiting)}"
        time.sleep(1)


async def test_the_services_run_with_the_rendered_settings_behind_the_nats_users(pods) -> None:
    """Every service starts, is alive and ready, and a product's feedback goes round the loop to a
    decision, over the services' NATS user; each then stops on SIGTERM within the pod's grace period."""
    running, procs, envs, logs = pods
    await asyncio.to_thread(wait_alive_and_ready, procs, envs)

    settings = NatsSettings(url=running.url, user=envs["registry"]["SEAL_NATS__USER"], password=running.password)
    scope = "k8s-pods"
    services_nc = await nats.connect(running.url, user=settings.user, password=running.password)
    try:
        kv = await services_nc.jetstream().key_value(subjects.KV_SCOPE_SETTINGS)
        # The tiny model learns nothing: this scope's gates accept any update.
        await kv.put(scope, ScopePolicy(candidates=1, strength_ladder=(1.0,), min_gain=-1.0, max_regression_drop=1.0,
                                        approval="auto").model_dump_json().encode())
    finally:
        await services_nc.close()

    feedback = ev.FeedbackSubmitted(feedback_id="k8s-pods-first", scope=scope, content=ev.KnowledgeFeedback(
        title="Varnholt Observatory", passage="The Varnholt Observatory stands on Mount Seddrin. It was founded in 1874."))
    async with PlatformWatcher(settings) as watcher:
        progress = watcher.progress.setdefault(feedback.feedback_id, FeedbackProgress(feedback.feedback_id))
        product = await nats.connect(running.url, user="product", password=running.product_password)
        try:  # as docs/feedback.md tells a product: a JetStream publish with the product's user
            await product.jetstream().publish(subjects.FEEDBACK_SUBMITTED, feedback.model_dump_json().encode(),
                                              headers={"Nats-Msg-Id": feedback.event_id})
        finally:
            await product.close()
        await watcher.wait_until(lambda: progress.decided, timeout=600)
    assert progress.of(ev.AdapterPromoted), progress.stage()
    assert all(proc.poll() is None for proc in procs.values()), "a service died"

    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        # uvicorn ends by raising the signal again once it has shut down, as a process killed by it would.
        assert proc.wait(60) in (0, -signal.SIGTERM), f"{name} exited with {proc.returncode} on SIGTERM"
        log = (logs / f"{name}.log").read_text(errors="replace")
        assert "Application shutdown complete" in log, f"{name} did not shut down gracefully"
