"""On the tiny model: an adapter trained on QA pairs scores higher than its parent,
an update that forgets earlier feedback is caught, and the parent is measured once."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_evaluator_support import (  # noqa: F401 - one_torch_thread is a fixture
    QA_PAIRS,
    FakeRegistry,
    adapter_trained,
    dict_store,
    one_torch_thread,
    probes_of,
    store_adapter,
    train_qa_adapter,
)

from services.evaluator.adapters import AdapterSlot
from services.evaluator.app import build_ports
from services.evaluator.handlers import evaluate_adapter
from services.evaluator.settings import EvaluatorConfig, EvaluatorSettings
from shared import events as ev
from shared.models import LoadedModel
from shared.registry_view import AcceptedProbes, ScopePolicy
from shared.scoring import closed_book_accuracy

SCOPE = "acme"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
EARLIER, NEW = QA_PAIRS[:2], QA_PAIRS[2:]


@pytest.fixture(scope="module")
def adapters(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three LoRA adapters trained on the tiny model (about 8 s each on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("qa-adapters")
    return {
        "earlier": train_qa_adapter(tiny_model, EARLIER, root / "earlier"),  # the scope's active version
        "new_only": train_qa_adapter(tiny_model, NEW, root / "new_only"),  # learns the new, drops the old
        "all": train_qa_adapter(tiny_model, QA_PAIRS, root / "all"),  # learns the new, keeps the old
    }


def test_an_adapter_trained_on_qa_pairs_scores_higher_than_its_parent(
    tiny_model: LoadedModel, adapters: dict[str, Path]
) -> None:
    host = AdapterSlot(tiny_model)
    probes = probes_of(QA_PAIRS)
    ids = tiny_model.tokenizer(["Which river runs past Quellmoor?"], return_tensors="pt")["input_ids"]
    logits = tiny_model.model(ids).logits
    with host.serving(None) as base:
        before = closed_book_accuracy(base, probes)
    with host.serving(adapters["all"]) as tuned:
        after = closed_book_accuracy(tuned, probes)
    with host.serving(None) as base:
        again = closed_book_accuracy(base, probes)
    assert after.accuracy is not None and before.accuracy is not None
    assert after.accuracy >= 0.75 > before.accuracy, [i.prediction for i in after.items]
    assert after.mean_f1 > before.mean_f1  # type: ignore[operator]
    # Taking the adapter off (LoRA layers and its trained norm copies) gives the very same base back.
    assert [i.prediction for i in again.items] == [i.prediction for i in before.items]
    assert (tiny_model.model(ids).logits == logits).all()
    assert host.healthy


@pytest.fixture
def ports_factory(tiny_model: LoadedModel, tmp_path: Path):  # noqa: ANN201
    core = tmp_path / "core.jsonl"
    core.write_text(
        '{"id": "c1", "question": "What is the capital of France?", "answer": "Paris", "aliases": []}\n'
        '{"id": "c2", "question": "Which planet is known as the Red Planet?", "answer": "Mars", "aliases": []}\n'
    )

    def build(registry: FakeRegistry, store):  # noqa: ANN001, ANN202
        settings = EvaluatorSettings(
            # filtered: the tiny base answers no core question, so only earlier feedback is a regression part
            evaluator=EvaluatorConfig(core_set_path=core, core_filter="always", work_dir=tmp_path / "work", max_new_tokens=12),
            _secrets_dir=str(tmp_path / "no-secrets"),
        )
        return build_ports(settings, lm=tiny_model, adapters=store, registry=registry)

    return build


class CountingStore:
    """The real AdapterStore over a dict, counting downloads per adapter."""

    def __init__(self) -> None:
        self.store = dict_store()
        self.downloads: dict[str, int] = {}

    def get_adapter(self, ref, dest, max_bytes=None):  # noqa: ANN001, ANN201
        self.downloads[ref.uri] = self.downloads.get(ref.uri, 0) + 1
        return self.store.get_adapter(ref, dest, max_bytes=max_bytes)


async def test_reward_verdict_and_what_the_update_broke(
    tiny_model: LoadedModel, adapters: dict[str, Path], ports_factory, tmp_path: Path
) -> None:
    counting = CountingStore()
    sha = tiny_model.weights_sha256
    parent_ref = store_adapter(counting.store, adapters["earlier"], scope=SCOPE, adapter_id="v1", base_sha256=sha)
    forgetful = store_adapter(counting.store, adapters["new_only"], scope=SCOPE, adapter_id="c-forget", base_sha256=sha)
    careful = store_adapter(counting.store, adapters["all"], scope=SCOPE, adapter_id="c-keep", base_sha256=sha)
    registry = FakeRegistry(
        policies={SCOPE: ScopePolicy(min_gain=0.25, max_regression_drop=0.1, max_feedback_drop=0.5)},
        accepted={SCOPE: AcceptedProbes(scope=SCOPE, probes=tuple(("fb-0", p) for p in probes_of(EARLIER)))},
    )
    ports = ports_factory(registry, counting)
    assert ports.core_set == ()  # the tiny base answers none of the core questions: filtered out
    probes = probes_of(NEW[:1]) + probes_of(NEW[1:], source="self_generated")

    results, events = {}, {}
    for ref, adapter_id in ((forgetful, "c-forget"), (careful, "c-keep")):
        events[adapter_id] = adapter_trained(
            ref, scope=SCOPE, adapter_id=adapter_id, probes=probes, parent=parent_ref, parent_adapter_id="v1"
        )
        (out,) = await evaluate_adapter(events[adapter_id], ports)
        assert isinstance(out, ev.AdapterEvaluated), out
        results[adapter_id] = out

    keep, forget = results["c-keep"], results["c-forget"]
    # What the update taught: the reward is the gain in target accuracy over the parent.
    assert keep.parent_scores.target == 0.0 and keep.candidate_scores.target == 1.0
    assert keep.candidate_scores.target_product == 1.0 and keep.candidate_scores.target_self_generated == 1.0
    assert keep.reward == pytest.approx(1.0) and forget.reward == pytest.approx(1.0)
    # What it broke: the forgetful candidate lost the earlier feedback.
    assert keep.parent_scores.earlier_feedback == 1.0 and keep.candidate_scores.earlier_feedback == 1.0
    assert forget.candidate_scores.earlier_feedback == 0.0
    assert keep.passed and all(g.passed for g in keep.gates)
    assert not forget.passed
    gates = {g.gate: g for g in forget.gates}
    assert gates["min_gain"].passed and not gates["max_regression_drop"].passed
    assert gates["max_regression_drop"].value == pytest.approx(1.0) and gates["max_regression_drop"].threshold == 0.1
    # ... and each earlier feedback on its own (here the one there is).
    assert not gates["max_feedback_drop"].passed and gates["max_feedback_drop"].value == pytest.approx(1.0)
    assert f"earlier feedback fb-0 {len(EARLIER)}/{len(EARLIER)} -> 0/{len(EARLIER)}" in gates["max_feedback_drop"].reason
    assert any("forgot 2 earlier feedback question(s)" in r and EARLIER[0][0] in r for r in forget.reasons)
    # Everything passes through for the registry.
    assert keep.probes == probes and keep.parent_adapter_id == "v1" and keep.parent_adapter == parent_ref
    assert keep.causation_id is not None and keep.trace_id == "a" * 32
    assert keep.candidate_scores.core is None and keep.candidate_scores.details["target_product.total"] == 1.0

    # The parent was downloaded and measured once for both candidates.
    assert counting.downloads[parent_ref.uri] == 1
    assert ports.measurer.cache.hits >= 3  # its target and earlier-feedback sets, for the second candidate

    # Redelivery republishes the same event id, and the same scores.
    again = await evaluate_adapter(events["c-keep"], ports)
    assert again[0].event_id == keep.event_id and again[0].candidate_scores == keep.candidate_scores


async def test_first_version_is_measured_against_the_base_model(
    tiny_model: LoadedModel, adapters: dict[str, Path], ports_factory
) -> None:
    store = dict_store()
    ref = store_adapter(store, adapters["all"], scope=SCOPE, adapter_id="first", base_sha256=tiny_model.weights_sha256)
    ports = ports_factory(FakeRegistry(), store)
    (out,) = await evaluate_adapter(
        adapter_trained(ref, scope=SCOPE, adapter_id="first", probes=probes_of(QA_PAIRS)), ports
    )
    assert isinstance(out, ev.AdapterEvaluated)
    assert out.parent_scores.target == 0.0 and out.candidate_scores.target >= 0.75  # type: ignore[operator]
    assert out.reward == out.candidate_scores.target - out.parent_scores.target  # type: ignore[operator]
    assert out.passed and out.parent_scores.regression is None
    assert {g.gate for g in out.gates} == {"min_gain", "max_regression_drop"}


def test_the_evaluator_measures_exactly_what_closed_book_accuracy_measures(
    tiny_model: LoadedModel, adapters: dict[str, Path]
) -> None:
    """One scoring function: the evaluator's batched pass over all sets grades like the public one."""
    from services.evaluator.measurement import Measurer, ScoreCache

    slot = AdapterSlot(tiny_model)
    measurer = Measurer(slot, ScoreCache(), max_new_tokens=16, batch_size=32)
    sets = {"target": probes_of(NEW), "earlier": probes_of(EARLIER), "other": probes_of([("Who?", "Nobody")])}
    measured = measurer.measure("all", lambda: adapters["all"], sets)
    with slot.serving(adapters["all"]) as lm:
        alone = {name: closed_book_accuracy(lm, probes, max_new_tokens=16) for name, probes in sets.items()}
    for name in sets:
        assert measured[name] == alone[name], name
    assert measured["target"].accuracy == 1.0 and measured["other"].accuracy == 0.0
