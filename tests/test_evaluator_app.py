"""The evaluator on the bus: in memory (TestNatsBroker) and against the real servers."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import nats
import pytest
from faststream.nats import JStream, TestNatsBroker
from test_evaluator_support import (  # noqa: F401 - one_torch_thread is a fixture
    QA_PAIRS,
    FakeRegistry,
    adapter_trained,
    dict_store,
    one_torch_thread,
    poison_adapter,
    probes_of,
    store_adapter,
    untrained_adapter,
)

from services.evaluator.app import build_ports, create_app
from services.evaluator.settings import EvaluatorConfig, EvaluatorSettings
from shared import events as ev
from shared.broker import publish_event
from shared.models import LoadedModel
from shared.registry_view import AcceptedProbes, ScopePolicy, probes_key
from shared.settings import ModelSettings
from shared.subjects import (
    ADAPTER_EVALUATED,
    ADAPTER_EVALUATION_FAILED,
    EVENTS_STREAM,
    KV_REGISTRY,
    KV_SCOPE_SETTINGS,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL_CACHE = Path(os.environ.get("SEAL_TEST_MODEL_CACHE", "~/.cache/seal/models")).expanduser()


@pytest.fixture(scope="module")
def fresh_adapter(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_adapter(tiny_model, tmp_path_factory.mktemp("app-fresh") / "adapter")


def in_memory(tiny_model: LoadedModel, tmp_path: Path):  # noqa: ANN201
    """Settings with a one-question core set, an in-memory adapter store, and the ports over them."""
    core = tmp_path / "core.jsonl"
    core.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n')
    settings = EvaluatorSettings(
        evaluator=EvaluatorConfig(core_set_path=core, core_filter="never", work_dir=tmp_path / "w", max_new_tokens=8),
        _secrets_dir=str(tmp_path / "no-secrets"),
    )
    store = dict_store()
    return settings, store, build_ports(settings, lm=tiny_model, adapters=store, registry=FakeRegistry())


async def test_subscriber_turns_adapter_trained_into_adapter_evaluated(
    tiny_model: LoadedModel, fresh_adapter: Path, tmp_path: Path
) -> None:
    settings, store, ports = in_memory(tiny_model, tmp_path)
    app = create_app(settings, ports)
    broker = app.broker
    got: asyncio.Queue[dict] = asyncio.Queue()

    @broker.subscriber(ADAPTER_EVALUATED, stream=JStream(EVENTS_STREAM, declare=False))
    async def evaluated(body: dict) -> None:
        await got.put(body)

    @broker.subscriber(ADAPTER_EVALUATION_FAILED, stream=JStream(EVENTS_STREAM, declare=False))
    async def failed(body: dict) -> None:
        await got.put(body)

    good = store_adapter(store, fresh_adapter, scope="acme", adapter_id="good", base_sha256=tiny_model.weights_sha256)
    nan = store_adapter(
        store, poison_adapter(fresh_adapter, tmp_path / "nan"), scope="acme", adapter_id="nan",
        base_sha256=tiny_model.weights_sha256,
    )
    async with TestNatsBroker(broker) as test_broker:
        sent = adapter_trained(good, scope="acme", adapter_id="good", probes=probes_of(QA_PAIRS[:1]))
        await publish_event(test_broker, sent)
        first = ev.parse_event(await asyncio.wait_for(got.get(), 30))
        await publish_event(test_broker, adapter_trained(nan, scope="acme", adapter_id="nan", probes=()))
        second = ev.parse_event(await asyncio.wait_for(got.get(), 30))
    assert isinstance(first, ev.AdapterEvaluated) and first.causation_id == sent.event_id
    assert first.candidate_scores.target_product == 0.0 and first.candidate_scores.core == 0.0
    assert isinstance(second, ev.AdapterEvaluationFailed) and "non-finite" in second.reason
    assert list(ports.evaluated) == ["good"]


async def test_a_judge_gone_quiet_mid_evaluation_leaves_every_side_to_the_rules(
    tiny_model: LoadedModel, fresh_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent (the base) was measured, and cached, while the judge answered; the next
    candidate is measured while it is down. Compared as they are, the judge's verdicts on one side
    only would count as the candidate's loss."""
    from services.evaluator import handlers, measurement

    settings, store, ports = in_memory(tiny_model, tmp_path)
    judge_up = [True]
    ports.measurer.judge = lambda question, prediction, refs: True if judge_up[0] else None
    # Every answer is one the rules grade wrong and the judge right.
    monkeypatch.setattr(measurement, "closed_book_answers", lambda lm, questions, **kw: ["the French capital"] * len(questions))
    results = []
    for adapter_id in ("first", "second"):
        ref = store_adapter(store, fresh_adapter, scope="acme", adapter_id=adapter_id, base_sha256=tiny_model.weights_sha256)
        results.append((await handlers.evaluate_adapter(adapter_trained(ref, scope="acme", adapter_id=adapter_id, probes=probes_of(QA_PAIRS[:1])), ports))[0])
        judge_up[0] = False
    first, second = results
    assert first.parent_scores.core == first.candidate_scores.core == 1.0  # the judge's verdicts, on both sides
    assert second.parent_scores.core == second.candidate_scores.core == 0.0  # the rules', on both sides
    assert second.reward == 0.0


@pytest.mark.servers
async def test_evaluator_on_real_servers_reads_scope_policy_and_earlier_probes(
    provisioned_stack, tiny_model: LoadedModel, fresh_adapter: Path, tmp_path: Path
) -> None:
    """Real NATS (KV for policy and accepted probes) and the real S3 server; the app's own startup."""
    settings = EvaluatorSettings(
        nats=provisioned_stack.nats_settings(),
        store=provisioned_stack.store_settings(),
        model=ModelSettings(name="tiny", cache_dir=MODEL_CACHE, device="cpu"),
        evaluator=EvaluatorConfig(work_dir=tmp_path / "w", max_new_tokens=8, core_filter="always"),
        _secrets_dir=str(tmp_path / "no-secrets"),
    )
    app = create_app(settings)
    runtime = app.state_runtime  # type: ignore[attr-defined]
    assert not runtime.ready()
    await runtime.start()  # loads the tiny base, filters the core set for it (not the default)
    assert runtime.ready() and runtime.ports.core_set == ()  # the random base knows no core facts

    from shared.store import AdapterStore

    store = AdapterStore.from_settings(settings.store)
    scope = "evaluator-real"
    sha = tiny_model.weights_sha256
    good = store_adapter(store, fresh_adapter, scope=scope, adapter_id="real-good", base_sha256=sha)
    nan = store_adapter(store, poison_adapter(fresh_adapter, tmp_path / "nan"), scope=scope, adapter_id="real-nan", base_sha256=sha)

    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        js = nc.jetstream()
        policy = ScopePolicy(min_gain=-0.5, max_regression_drop=0.3)
        await (await js.key_value(KV_SCOPE_SETTINGS)).put(scope, policy.model_dump_json().encode())
        earlier = AcceptedProbes(scope=scope, probes=(("fb-old", probes_of(QA_PAIRS[1:2])[0]),))
        await (await js.key_value(KV_REGISTRY)).put(probes_key(scope), earlier.model_dump_json().encode())
        sub = await nc.subscribe("seal.events.adapter.*")
        async with app.broker:
            await app.broker.start()
            sent = adapter_trained(good, scope=scope, adapter_id="real-good", probes=probes_of(QA_PAIRS[:1]))
            bad = adapter_trained(nan, scope=scope, adapter_id="real-nan", probes=())
            await publish_event(app.broker, sent)
            await publish_event(app.broker, bad)
            out = {}
            while len(out) < 2:
                msg = await sub.next_msg(timeout=60)
                event = ev.parse_event(json.loads(msg.data))
                if event.causation_id in (sent.event_id, bad.event_id):
                    out[event.causation_id] = event
    finally:
        await nc.close()
    evaluated, failed = out[sent.event_id], out[bad.event_id]
    assert isinstance(evaluated, ev.AdapterEvaluated)
    gates = {g.gate: g for g in evaluated.gates}
    assert gates["min_gain"].threshold == -0.5 and gates["max_regression_drop"].threshold == 0.3
    assert evaluated.passed  # reward 0 >= -0.5; nothing forgotten
    assert evaluated.candidate_scores.details["earlier_feedback.total"] == 1.0
    assert evaluated.trace_id and len(evaluated.trace_id) == 32 and evaluated.trace_id != "a" * 32
    assert isinstance(failed, ev.AdapterEvaluationFailed) and "non-finite weights" in failed.reason
    # The core filter for this base was remembered in the object store.
    names = [o.object_name for o in store.client.list_objects(store.bucket, prefix="evaluator/core-knowledge/", recursive=True)]
    assert any(name.startswith(f"evaluator/core-knowledge/{sha}") for name in names)


async def test_a_contaminated_base_fails_liveness_not_only_readiness() -> None:
    """A worker pod sits behind no Service: NotReady does not stop it taking messages. Once an
    adapter could not be taken off the base, /healthz fails, and Kubernetes restarts the pod."""
    from types import SimpleNamespace

    import httpx
    from faststream.nats import NatsBroker

    from services.evaluator.app import Runtime
    from shared.runtime import service_app

    def runtime(healthy: bool) -> Runtime:
        ports = SimpleNamespace(measurer=SimpleNamespace(host=SimpleNamespace(healthy=healthy)))
        return Runtime(None, None, ports)  # type: ignore[arg-type]

    assert runtime(True).alive() and not runtime(False).alive()
    assert Runtime(None, None, None).alive()  # still starting: the startup probe waits
    app = service_app(NatsBroker(), ready=runtime(False).ready, alive=runtime(False).alive)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://evaluator") as http:
        broken = await http.get("/healthz")
    assert broken.status_code == 500 and broken.content == b"broken"


def test_what_a_killed_evaluator_left_in_its_work_dir_is_removed_at_start(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """Killed mid-evaluation (out of memory, past its grace period), an evaluator leaves a downloaded
    adapter in its work dir, which in a pod is a size-limited volume that outlives the container."""
    import os

    work = tmp_path / "w"
    left = work / "999999999" / "eval-abc" / "candidate"  # a process id no process has
    left.mkdir(parents=True)
    (left / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    theirs = work / "notes"  # not a process's folder: not ours to remove
    theirs.mkdir()
    _, _, ports = in_memory(tiny_model, tmp_path)
    assert not (work / "999999999").exists() and theirs.is_dir()
    assert ports.work_dir == work / str(os.getpid())
