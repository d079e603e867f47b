"""The whole loop, end to end: four services as separate processes, real servers, tiny model.

One feedback leads to one promoted version whose lineage goes back to it and
whose spans, across all four services, share one trace id; a second feedback
on the same scope builds on the first version.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from otlp_sink import OtlpSink

from seal.stack import LocalStack, StackPorts, free_port
from seal.watch import PlatformWatcher
from shared import events as ev
from shared.broker import ensure_streams_at
from shared.registry_view import ScopePolicy, read_active
from shared.store import AdapterStore
from shared.subjects import KV_SCOPE_SETTINGS
from shared.telemetry import FEEDBACK_ID

pytestmark = [pytest.mark.servers, pytest.mark.slow]

SERVICES = ("registry", "generator", "trainer", "evaluator")
MODEL_CACHE = Path(os.environ.get("SEAL_TEST_MODEL_CACHE", "~/.cache/seal/models")).expanduser()
PASSAGES = [
    ("Varnholt Observatory", "The Varnholt Observatory stands on Mount Seddrin. It was founded in 1874 by Helka Strand."),
    ("Brinmoor Canal", "The Brinmoor Canal joins the river Ostra to Calder Reach. It climbs through 19 locks."),
]


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    with OtlpSink() as running:
        yield running


@pytest.fixture(scope="module")
def loop_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("e2e"), StackPorts.free()) as stack:
        asyncio.run(ensure_streams_at(stack.nats_settings()))
        AdapterStore.from_settings(stack.store_settings()).ensure_bucket()
        yield stack


@pytest.fixture(scope="module")
def services(loop_stack: LocalStack, sink: OtlpSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen]]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    procs: dict[str, subprocess.Popen] = {}
    for name in SERVICES:
        env = {
            **os.environ,
            **loop_stack.env(),
            "SEAL_MODEL__NAME": "tiny",
            "SEAL_MODEL__CACHE_DIR": str(MODEL_CACHE),
            "SEAL_TELEMETRY__OTLP_ENDPOINT": sink.endpoint,
            "SEAL_HTTP_HOST": "127.0.0.1",
            "SEAL_HTTP_PORT": str(free_port()),
            "SEAL_LOG_LEVEL": "INFO",
        }
        out = (logs / f"{name}.log").open("wb")
        procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for name, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name in SERVICES:
            text = (logs / f"{name}.log").read_text(errors="replace")
            print(f"----- {name} log (tail) -----\n{text[-3000:]}")


async def set_permissive_policy(stack: LocalStack, scope: str) -> None:
    """The tiny model learns nothing, so this scope's gates accept any update."""
    nc = await nats.connect(stack.nats_url)
    try:
        kv = await nc.jetstream().key_value(KV_SCOPE_SETTINGS)
        policy = ScopePolicy(candidates=2, min_gain=-1.0, max_regression_drop=1.0, approval="auto")
        await kv.put(scope, policy.model_dump_json().encode())
    finally:
        await nc.close()


async def active_version(stack: LocalStack, scope: str) -> int | None:
    nc = await nats.connect(stack.nats_url)
    try:
        active = await read_active(nc.jetstream(), scope)
        return active.version if active else None
    finally:
        await nc.close()


def feedback(scope: str, title: str, passage: str, feedback_id: str) -> ev.FeedbackSubmitted:
    return ev.FeedbackSubmitted(
        feedback_id=feedback_id, scope=scope, content=ev.KnowledgeFeedback(title=title, passage=passage)
    )


# Fixed feedback ids: the generator seeds its sampling from the feedback id, so the tiny model
# writes the same completions every run. With random ids, now and then both candidates' random
# text held a digit run that the generator's screening rightly refuses as a phone number, and
# the feedback was rejected before the loop this test is about had run.
FEEDBACK_IDS = ("e2e-loop-first", "e2e-loop-second")


def wait_for_spans(sink: OtlpSink, feedback_id: str, services: set[str], timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in sink.snapshot() if s.attributes.get(FEEDBACK_ID) == feedback_id]
        trace_ids = {s.trace_id for s in spans}
        mine = [s for s in sink.snapshot() if s.trace_id in trace_ids]
        if {s.service for s in mine} >= services or time.monotonic() > deadline:
            return mine
        time.sleep(0.5)


async def test_feedback_becomes_a_traced_version_and_the_next_builds_on_it(
    loop_stack: LocalStack, services: dict[str, subprocess.Popen], sink: OtlpSink
) -> None:
    scope = "e2e-scope"
    await set_permissive_policy(loop_stack, scope)
    store = AdapterStore.from_settings(loop_stack.store_settings())
    async with PlatformWatcher(loop_stack.nats_settings()) as watcher:
        first = feedback(scope, *PASSAGES[0], FEEDBACK_IDS[0])
        await watcher.submit(first)
        progress = watcher.progress[first.feedback_id]
        await watcher.wait_until(lambda: progress.decided, timeout=600)
        assert all(p.poll() is None for p in services.values()), "a service died"
        promoted = progress.of(ev.AdapterPromoted)
        assert len(promoted) == 1, progress.stage()
        v1 = promoted[0]
        assert v1.version == 1 and await active_version(loop_stack, scope) == 1  # type: ignore[attr-defined]

        # Lineage: version -> evaluation -> training run -> self-edit -> feedback.
        evaluated = {e.adapter_id: e for e in progress.of(ev.AdapterEvaluated)}  # type: ignore[attr-defined]
        trained = {e.adapter_id: e for e in progress.of(ev.AdapterTrained)}  # type: ignore[attr-defined]
        generated = {e.self_edit.self_edit_id: e for e in progress.of(ev.SelfEditGenerated)}  # type: ignore[attr-defined]
        chosen = evaluated[v1.adapter_id]  # type: ignore[attr-defined]
        run = trained[v1.adapter_id]  # type: ignore[attr-defined]
        edit = generated[run.self_edit_id]
        assert edit.causation_id == first.event_id
        assert run.causation_id == edit.event_id and chosen.causation_id == run.event_id
        manifest = store.read_manifest(v1.adapter)  # type: ignore[attr-defined]
        assert manifest.feedback_ids == (first.feedback_id,)
        assert manifest.self_edit_id == run.self_edit_id and manifest.parent_adapter_id is None

        # One trace across all four services.
        spans = wait_for_spans(sink, first.feedback_id, {f"{n}" for n in SERVICES})
        assert {s.service.split("-")[-1] for s in spans} >= set(SERVICES), {s.service for s in spans}
        assert len({s.trace_id for s in spans}) == 1
        assert v1.version == 1

        # The second feedback builds on version 1.
        second = feedback(scope, *PASSAGES[1], FEEDBACK_IDS[1])
        await watcher.submit(second)
        progress2 = watcher.progress[second.feedback_id]
        await watcher.wait_until(lambda: progress2.decided, timeout=600)
        promoted2 = progress2.of(ev.AdapterPromoted)
        assert len(promoted2) == 1, progress2.stage()
        assert promoted2[0].version == 2  # type: ignore[attr-defined]
        manifest2 = store.read_manifest(promoted2[0].adapter)  # type: ignore[attr-defined]
        assert manifest2.parent_adapter_id == v1.adapter_id  # type: ignore[attr-defined]
        # It also trained on what version 1 was trained on (replay), and records both updates.
        lineage = manifest2.training["lineage"]
        assert [g["adapter_id"] for g in lineage] == [v1.adapter_id, manifest2.adapter_id]  # type: ignore[attr-defined]
        assert lineage[0]["sequences"] == manifest.training["lineage"][0]["sequences"]
        assert manifest2.training["replayed_per_epoch"] > 0
        # And it was measured on what the first feedback taught: its probes are the scope's regression set.
        details = progress2.of(ev.AdapterEvaluated)[0].candidate_scores.details  # type: ignore[attr-defined]
        assert details.get("earlier_feedback.total", 0) >= 1, details
        assert await active_version(loop_stack, scope) == 2
