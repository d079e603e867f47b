"""Scores, reward, gates and reasons from measured probe sets (pure), and the score cache."""

from __future__ import annotations

import pytest

from services.evaluator.handlers import earlier_probes, probe_sets
from services.evaluator.measurement import ScoreCache
from services.evaluator.verdict import judge_update, scores_of
from shared import events as ev
from shared.registry_view import AcceptedProbes, ScopePolicy
from shared.scoring import ClosedBookResult, GradedAnswer, normalize_answer


def result(*marks: bool, prefix: str = "q") -> ClosedBookResult:
    return ClosedBookResult(
        tuple(
            GradedAnswer(f"{prefix}{i}?", f"a{i}", f"a{i}" if ok else "no idea", ok, ok, ok, float(ok))
            for i, ok in enumerate(marks)
        )
    )


def sets(product=(), self_generated=(), core=(), earlier=()) -> dict[str, ClosedBookResult]:  # noqa: ANN001
    return {
        "target_product": result(*product, prefix="p"),
        "target_self_generated": result(*self_generated, prefix="s"),
        "core": result(*core, prefix="c"),
        "earlier_feedback": result(*earlier, prefix="e"),
    }


def test_scores_separate_product_and_self_generated_and_weigh_the_product_more() -> None:
    scores = scores_of(sets(product=(True, True), self_generated=(False, False, False, True)), product_weight=2.0)
    assert scores.target_product == 1.0 and scores.target_self_generated == 0.25
    assert scores.target == pytest.approx((2 * 1.0 + 0.25) / 3)
    assert scores.core is None and scores.earlier_feedback is None and scores.regression is None
    assert scores.details["target_product.total"] == 2.0 and scores.details["target_self_generated.correct"] == 1.0


def test_regression_is_the_mean_of_core_and_earlier_feedback() -> None:
    scores = scores_of(sets(product=(True,), core=(True, True, True, False), earlier=(True, False)), 2.0)
    assert scores.core == 0.75 and scores.earlier_feedback == 0.5
    assert scores.regression == pytest.approx(0.625)


def verdict(candidate: dict, parent: dict, **policy: float):  # noqa: ANN201
    c, p = scores_of(candidate, 2.0), scores_of(parent, 2.0)
    return judge_update(c, p, ScopePolicy(**policy), candidate, parent)


def test_reward_is_the_target_gain_and_both_gates_pass() -> None:
    out = verdict(
        sets(product=(True, True), core=(True, True)),
        sets(product=(False, True), core=(True, True)),
        min_gain=0.1,
        max_regression_drop=0.0,
    )
    assert out.reward == pytest.approx(0.5) and out.passed
    gain, regression = out.gates
    assert (gain.gate, gain.value, gain.threshold) == ("min_gain", pytest.approx(0.5), 0.1)
    assert regression.gate == "max_regression_drop" and regression.value == 0.0
    assert out.reasons[0].startswith("passed min_gain: target accuracy 50.0% -> 100.0%")


def test_too_small_a_gain_fails_with_the_numbers() -> None:
    out = verdict(sets(product=(True, False, False, False)), sets(product=(False,) * 4), min_gain=0.5)
    assert out.reward == pytest.approx(0.25) and not out.passed
    assert "failed min_gain" in out.reasons[0] and "below the minimum +0.500" in out.reasons[0]


def test_a_core_drop_fails_even_when_earlier_feedback_improves() -> None:
    out = verdict(
        sets(product=(True,), core=(True, False, False, False), earlier=(True, True)),
        sets(product=(False,), core=(True, True, True, True), earlier=(False, False)),
        min_gain=0.0,
        max_regression_drop=0.1,
    )
    regression = out.gates[1]
    assert not regression.passed and regression.value == pytest.approx(0.75)
    assert "largest drop +0.750 on core" in regression.reason
    assert any(r.startswith("forgot 3 core question(s): 'c1?' (expected 'a1', now 'no idea')") for r in out.reasons)
    assert not out.passed


def test_the_drop_threshold_is_inclusive_and_per_scope() -> None:
    candidate = sets(product=(True,), core=(True,) * 9 + (False,))
    parent = sets(product=(False,), core=(True,) * 10)
    assert verdict(candidate, parent, max_regression_drop=0.1).passed
    assert not verdict(candidate, parent, max_regression_drop=0.05).passed


def test_drops_within_the_per_update_gate_cannot_add_up_past_the_base_gate() -> None:
    # each update loses one core question of 20 (5 points, within a per-update 0.05): the third
    # such update leaves core 15 points below the base model's, past the scope's 0.10
    def update(core_before: int, core_after: int, base_core: float | None = 1.0):  # noqa: ANN202
        candidate = sets(product=(True,), core=(True,) * core_after + (False,) * (20 - core_after))
        parent = sets(product=(False,), core=(True,) * core_before + (False,) * (20 - core_before))
        c, p = scores_of(candidate, 2.0), scores_of(parent, 2.0)
        return judge_update(c, p, ScopePolicy(max_regression_drop=0.05, max_core_drop_from_base=0.1), candidate, parent,
                            base_core=base_core)

    assert update(20, 19).passed and update(19, 18).passed
    third = update(18, 17)
    assert not third.passed and [g.gate for g in third.gates if not g.passed] == ["max_core_drop_from_base"]
    assert "core 100.0% on the base model -> 85.0% after all of the scope's updates (drop +0.150, exceeds the allowed 0.100)" \
        in third.gates[-1].reason
    assert update(18, 17, base_core=None).passed  # a first update (no base score given): the per-update gate only


def test_no_target_probes_counts_as_no_gain() -> None:
    strict = verdict(sets(core=(True,)), sets(core=(True,)), min_gain=0.01)
    assert strict.reward == 0.0 and not strict.passed and "no probes" in strict.gates[0].reason
    lenient = verdict(sets(core=(True,)), sets(core=(True,)), min_gain=-1.0)
    assert lenient.passed


def test_no_regression_probes_passes_that_gate() -> None:
    out = verdict(sets(product=(True,)), sets(product=(False,)))
    assert out.gates[1].passed and "nothing to break" in out.gates[1].reason


def test_probe_sets_keep_earlier_feedback_apart_from_the_new() -> None:
    ref = ev.ManifestRef(uri="s3://b/adapters/acme/x", manifest_sha256="0" * 64)
    new = (
        ev.Probe(question="How many locks?", answer="19"),
        ev.Probe(question="Who founded it?", answer="Helka Strand", source="self_generated"),
    )
    event = ev.AdapterTrained(
        feedback_id="fb-2", scope="acme", adapter_id="a", self_edit_id="s", adapter=ref, probes=new
    )
    accepted = AcceptedProbes(
        scope="acme",
        probes=(
            ("fb-1", ev.Probe(question="What year?", answer="1874")),
            ("fb-1", ev.Probe(question="How many locks?", answer="17")),  # corrected by the new feedback
            ("fb-2", ev.Probe(question="Only mine?", answer="yes")),  # this feedback's own (a rebase)
            ("fb-3", ev.Probe(question="what year", answer="1875")),  # a later answer to the same question
        ),
    )
    core = (ev.Probe(question="Capital of France?", answer="Paris"),)
    earlier = earlier_probes(event, accepted)
    out = probe_sets(event, earlier, core)
    assert [p.question for p in out["target_product"]] == ["How many locks?"]
    assert [p.question for p in out["target_self_generated"]] == ["Who founded it?"]
    assert [(p.question, p.answer) for p in out["earlier_feedback"]] == [("what year", "1875")]
    assert out["core"] == core
    assert {key: fid for key, (fid, _) in earlier.items()} == {"what year": "fb-3"}


# Earlier probes e0?..e5?: e0-e2 from feedback A, e3-e5 from feedback B.
OWNERS = {normalize_answer(f"e{i}?"): ("fb-A" if i < 3 else "fb-B") for i in range(6)}


def feedback_verdict(candidate_earlier: tuple[bool, ...], parent_earlier: tuple[bool, ...], **policy: float):  # noqa: ANN201
    candidate, parent = sets(product=(True,), earlier=candidate_earlier), sets(product=(False,), earlier=parent_earlier)
    return judge_update(scores_of(candidate, 2.0), scores_of(parent, 2.0), ScopePolicy(**policy), candidate, parent, OWNERS)


def test_the_feedback_gate_sees_one_earlier_feedback_lost_where_the_pooled_part_nets_it_out() -> None:
    # A loses 2 of its 3 probes, B gains 2: the pooled earlier-feedback part does not move.
    out = feedback_verdict((True, False, False, True, True, True), (True, True, True, True, False, False),
                           max_feedback_drop=0.34)
    gates = {g.gate: g for g in out.gates}
    assert gates["max_regression_drop"].passed and gates["max_regression_drop"].value == pytest.approx(0.0)
    assert not gates["max_feedback_drop"].passed and not out.passed
    assert gates["max_feedback_drop"].value == pytest.approx(2 / 3)
    assert "earlier feedback fb-A 3/3 -> 1/3 probes" in gates["max_feedback_drop"].reason
    assert "the largest of 2 earlier feedback, exceeds the allowed 0.340" in gates["max_feedback_drop"].reason


def test_the_feedback_gate_allows_its_threshold_and_is_off_by_default() -> None:
    one_lost = ((True, True, False, True, True, True), (True, True, True, True, True, True))
    out = feedback_verdict(*one_lost, max_feedback_drop=0.34, max_regression_drop=0.5)
    assert out.passed and {g.gate: g for g in out.gates}["max_feedback_drop"].value == pytest.approx(1 / 3)
    assert not feedback_verdict(*one_lost, max_feedback_drop=0.3, max_regression_drop=0.5).passed
    default = feedback_verdict(*one_lost, max_regression_drop=0.5)
    assert default.passed and [g.gate for g in default.gates] == ["min_gain", "max_regression_drop"]


def test_the_feedback_gate_without_earlier_feedback_passes() -> None:
    out = feedback_verdict((), (), max_feedback_drop=0.0)
    assert out.passed and "no earlier feedback" in out.gates[-1].reason


def test_score_cache_is_bounded_and_counts() -> None:
    cache = ScoreCache(max_entries=2)
    cache.put("m", "a", result(True))
    cache.put("m", "b", result(False))
    assert cache.get("m", "a") is not None  # a is now the most recent
    cache.put("m", "c", result(True))
    assert cache.get("m", "b") is None and cache.get("m", "a") is not None and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
