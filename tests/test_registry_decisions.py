"""The decision state machine through the ledger, with an in-memory KV and fakes."""

from __future__ import annotations

import json

import pytest
from test_registry_support import (
    T0,
    evaluated,
    feedback,
    make_world,
    self_edit,
    training_failed,
)

from services.registry import handlers, intake
from services.registry.records import FeedbackRecord, ScopeHead, feedback_key
from shared import events as ev
from shared.registry_view import AcceptedProbes, ActiveAdapter, ScopePolicy
from shared.subjects import KV_REGISTRY


async def record_of(world, root: ev.Event) -> FeedbackRecord:
    found = await world.state.read(KV_REGISTRY, feedback_key(root.scope, root.feedback_id), FeedbackRecord)
    assert found is not None
    return found


async def test_best_passing_candidate_becomes_the_next_version() -> None:
    w = make_world()
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, "f" * 32)
    await handlers.on_adapter_evaluated(evaluated(root, 0, 3, reward=0.10), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(root, 1, 3, reward=0.30), w.ledger)
    assert w.bus.events == []  # 2 of 3 candidates: nothing decided yet
    await handlers.on_adapter_evaluated(evaluated(root, 2, 3, reward=0.20), w.ledger)

    # The decision goes out first, then the candidates it rejected, then the feedback's end.
    assert w.bus.types() == ["adapter.promoted", "adapter.rejected", "adapter.rejected", "feedback.decided"]
    [decided] = w.bus.of(ev.FeedbackDecided)
    assert (decided.outcome, decided.version, decided.adapter_id, decided.reasons) == ("promoted", 1, f"ad-{root.feedback_id[:8]}-1-1", ())
    promoted = w.bus.of(ev.AdapterPromoted)
    assert [(p.version, p.adapter_id, p.previous_version) for p in promoted] == [(1, f"ad-{root.feedback_id[:8]}-1-1", None)]
    rejected = {e.adapter_id: e.reasons for e in w.bus.of(ev.AdapterRejected)}
    assert len(rejected) == 2
    assert all("candidate 1 ranked higher" in r[0] for r in rejected.values())
    # Readers that only know ActiveAdapter see the head.
    active = await w.state.read(KV_REGISTRY, "active.acme", ActiveAdapter)
    assert active is not None and active.version == 1 and active.adapter_id == promoted[0].adapter_id
    probes = await w.state.read(KV_REGISTRY, "probes.acme", AcceptedProbes)
    assert probes is not None and [(fid, p.answer) for fid, p in probes.probes] == [(root.feedback_id, "1387")]
    record = await record_of(w, root)
    assert record.state == "promoted" and record.version == 1 and record.outbox == ()
    version = await w.ledger.version("acme", 1)
    assert version.feedback_id == root.feedback_id
    assert version.trace_id == "e" * 32 and version.base_model == "tiny" and version.reward == pytest.approx(0.30)
    assert version.candidate_scores is not None and version.approved_by == "auto"
    # The open index is cleaned up once decided.
    assert await w.state.entries(KV_REGISTRY, "open.>", ScopeHead) == {}


async def test_a_promoted_passage_without_product_probes_is_guarded_by_its_self_generated_ones() -> None:
    w = make_world()
    root = feedback()
    root = root.model_copy(update={"content": root.content.model_copy(update={"probes": ()})})  # the passage alone
    await handlers.on_feedback_submitted(root, w.ledger, "f" * 32)

    def own(answer: str) -> tuple[ev.Probe, ...]:
        return (ev.Probe(question=f"What is {answer}?", answer=answer, source="self_generated"),)

    await handlers.on_adapter_evaluated(evaluated(root, 0, 2, reward=0.2, probes=own("the charter")), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(root, 1, 2, reward=0.1, probes=own("the river")), w.ledger)

    assert w.bus.types()[0] == "adapter.promoted"
    # The chosen candidate's probes, not the other's, become the scope's regression set.
    accepted = await w.state.read(KV_REGISTRY, "probes.acme", AcceptedProbes)
    assert accepted is not None
    assert [(fid, p.answer, p.source) for fid, p in accepted.probes] == [(root.feedback_id, "the charter", "self_generated")]
    assert [p.answer for p in (await w.ledger.version("acme", 1)).probes] == ["the charter"]


async def test_failures_count_as_outcomes_and_nothing_passing_rejects_all() -> None:
    w = make_world()
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, None)
    await handlers.on_pipeline_failure(training_failed(root, 0, 3), w.ledger)
    await handlers.on_selfedit_rejected(
        root.caused(ev.SelfEditRejected, key=1, self_edit_id="se1", candidate_index=1, candidate_count=3, reasons=("empty",)),
        w.ledger,
    )
    assert w.bus.events == []
    await handlers.on_adapter_evaluated(evaluated(root, 2, 3, reward=0.0, passed=False), w.ledger)

    record = await record_of(w, root)
    assert record.state == "rejected"
    assert record.reasons == ("none of 3 candidate(s) with an outcome passed every gate",)
    reasons = {c.index: c.reasons for c in record.candidates}
    assert reasons[0] == ("training failed: CUDA out of memory",)
    assert reasons[1] == ("self-edit rejected: empty",)
    assert "gain 0.000 < 0.01" in reasons[2]
    assert {c.verdict for c in record.candidates} == {"rejected"}
    assert w.bus.types() == ["adapter.rejected"] * 3 + ["feedback.decided"]
    [decided] = w.bus.of(ev.FeedbackDecided)
    assert (decided.outcome, decided.version, decided.reasons) == ("rejected", None, record.reasons)
    assert await w.state.read(KV_REGISTRY, "active.acme", ActiveAdapter) is None


async def test_candidates_may_arrive_before_the_feedback_itself() -> None:
    w = make_world()
    root = feedback()
    await handlers.on_adapter_evaluated(evaluated(root, 0, 2, reward=0.2), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(root, 1, 2, reward=0.1), w.ledger)
    assert [e.version for e in w.bus.of(ev.AdapterPromoted)] == [1]
    await handlers.on_feedback_submitted(root, w.ledger, "f" * 32)  # late lineage root: recorded, nothing re-decided
    record = await record_of(w, root)
    assert record.state == "promoted" and record.summary and record.trace_id == "f" * 32
    assert len(w.bus.of(ev.AdapterPromoted)) == 1


async def test_the_same_feedback_id_with_other_content_does_not_rewrite_the_record() -> None:
    # the generator trains the first event of a feedback id only; the record must keep showing it
    w = make_world()
    root = feedback(passage="Quellmoor got its charter in 1387.")
    await handlers.on_feedback_submitted(root, w.ledger, None)
    other = root.model_copy(update={"event_id": ev.new_id(), "content": ev.CorrectionFeedback(question="Who?", right_answer="Bob")})
    await handlers.on_feedback_submitted(other, w.ledger, None)
    record = await record_of(w, root)
    assert (record.kind, record.feedback_event_id) == ("knowledge", root.event_id) and "1387" in (record.summary or "")
    assert record.feedback_probes == intake.feedback_probes(root.content)


def test_a_feedback_event_without_an_id_gets_the_same_one_in_every_reader() -> None:
    body = {"type": "feedback.submitted", "feedback_id": "fb-1", "scope": "acme",
            "content": {"kind": "correction", "question": "Capital?", "right_answer": "Paris"}}
    first, second = (ev.parse_event(json.dumps(body).encode()) for _ in range(2))
    assert first.event_id == second.event_id == ev.derived_id("feedback", "acme", "fb-1")
    assert ev.parse_event(json.dumps({**body, "event_id": "mine"}).encode()).event_id == "mine"
    assert ev.parse_event(json.dumps({**body, "scope": "globex"}).encode()).event_id != first.event_id


async def test_decision_timeout_decides_with_what_arrived() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=3, decision_timeout_s=60)
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, None)
    await handlers.on_adapter_evaluated(evaluated(root, 0, 3, reward=0.2), w.ledger)
    assert await w.ledger.sweep() == 1 and w.bus.events == []  # before the deadline
    w.clock.advance(61)
    await w.ledger.sweep()
    assert [e.version for e in w.bus.of(ev.AdapterPromoted)] == [1]
    record = await record_of(w, root)
    timed_out = [c for c in record.candidates if c.result == "timed_out"]
    assert [c.index for c in timed_out] == [1, 2]
    assert all("decision timeout (60s)" in c.reasons[0] for c in timed_out)

    # An evaluation that comes after the decision is kept for the lineage and rejected.
    await handlers.on_adapter_evaluated(evaluated(root, 1, 3, reward=0.9), w.ledger)
    late = [e for e in w.bus.of(ev.AdapterRejected) if e.adapter_id == f"ad-{root.feedback_id[:8]}-1-1"]
    assert late and "after the feedback was decided" in late[0].reasons[0]
    assert (await w.ledger.head("acme")).version == 1  # type: ignore[union-attr]


async def test_nothing_at_all_within_the_timeout_is_rejected() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=2, decision_timeout_s=10)
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, None)
    w.clock.advance(11)
    await w.ledger.sweep()
    record = await record_of(w, root)
    assert record.state == "rejected" and "no candidate had an outcome within the decision timeout (10s)" in record.reasons[0]
    assert all(c.result == "timed_out" for c in record.candidates)


async def test_redelivered_events_publish_nothing_new() -> None:
    w = make_world()
    root = feedback()
    events = [evaluated(root, 0, 2, reward=0.2), evaluated(root, 1, 2, reward=0.1)]
    for event in events + events:
        await handlers.on_adapter_evaluated(event, w.ledger)
    assert w.bus.types().count("adapter.promoted") == 1
    assert len(w.bus.events) == len({e.event_id for e in w.bus.events}) == 3  # promoted, rejected, decided


async def test_a_crash_before_publishing_republishes_the_same_event_ids() -> None:
    w = make_world()
    root = feedback()
    await handlers.on_adapter_evaluated(evaluated(root, 0, 2, reward=0.2), w.ledger)
    last = evaluated(root, 1, 2, reward=0.1)
    w.bus.fail_next = 1
    with pytest.raises(ConnectionError):
        await handlers.on_adapter_evaluated(last, w.ledger)
    assert (await record_of(w, root)).outbox  # decided, not yet announced
    await handlers.on_adapter_evaluated(last, w.ledger)  # JetStream redelivers the message
    first_ids = [e.event_id for e in w.bus.events]
    # Recomputing the same decision yields the same ids (JetStream would drop copies).
    w2 = make_world()
    await handlers.on_adapter_evaluated(evaluated(root, 0, 2, reward=0.2), w2.ledger)
    await handlers.on_adapter_evaluated(last, w2.ledger)
    assert sorted(first_ids) == sorted(e.event_id for e in w2.bus.events)
    assert (await record_of(w, root)).outbox == ()


async def test_manual_policy_holds_then_approval_promotes() -> None:
    from services.registry import actions

    w = make_world()
    await w.set_policy("acme", candidates=1, approval="manual")
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, None)
    await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2), w.ledger)
    assert w.bus.types() == ["adapter.awaiting_approval"]
    record = await record_of(w, root)
    assert record.state == "awaiting_approval" and record.hold == "manual"
    assert await w.ledger.head("acme") is None

    await actions.approve(w.ledger, root.feedback_id, "sre-alice", "looked at the scores")
    promoted = w.bus.of(ev.AdapterPromoted)
    assert [(p.version, p.approved_by) for p in promoted] == [(1, "sre-alice")]
    audit = w.bus.of(ev.OperatorAction)
    assert [(a.action, a.operator, a.reason) for a in audit] == [("approve", "sre-alice", "looked at the scores")]
    assert (await w.ledger.version("acme", 1)).approved_by == "sre-alice"


async def test_an_approval_outside_any_trace_is_recorded_in_the_feedbacks_trace() -> None:
    # the operator's command (HTTP, request-reply) and the sweep carry no trace of the feedback: what
    # they decide is published, and recorded, in the feedback's own trace
    import dataclasses

    from services.registry import actions
    from shared.telemetry import current_trace_id, feedback_root

    w = make_world()
    w.ledger.ports = dataclasses.replace(w.ledger.ports, trace_id=current_trace_id)  # the real one
    for scope, trace_id in (("acme", "0af7651916cd43dd8448eb211c80319c"), ("globex", None)):  # as intake recorded it, or none
        await w.set_policy(scope, candidates=1, approval="manual")
        root = feedback(scope)
        await handlers.on_feedback_submitted(root, w.ledger, trace_id)
        await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2), w.ledger)
        assert current_trace_id() is None
        await actions.approve(w.ledger, root.feedback_id, "sre-alice", "looked at the scores")
        head = await w.ledger.head(scope)
        assert head is not None
        version = await w.ledger.version(scope, head.version)
        assert version.registry_trace_id == (trace_id or feedback_root(root.feedback_id, scope)[0])
    assert current_trace_id() is None  # and nothing of it is left attached


async def test_an_approval_over_request_reply_is_recorded_in_the_feedbacks_trace_not_the_requests() -> None:
    # a NATS request-reply command runs in its message's own trace: what it decides still joins the feedback's
    import dataclasses

    from opentelemetry import trace

    from services.registry import actions
    from shared.telemetry import current_trace_id, feedback_context

    w = make_world()
    w.ledger.ports = dataclasses.replace(w.ledger.ports, trace_id=current_trace_id)
    await w.set_policy("acme", candidates=1, approval="manual")
    root = feedback("acme")
    await handlers.on_feedback_submitted(root, w.ledger, "0af7651916cd43dd8448eb211c80319c")
    await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2), w.ledger)
    request_trace = "1234567890abcdef1234567890abcdef"
    with trace.use_span(trace.NonRecordingSpan(trace.get_current_span(feedback_context("rpc", request_trace)).get_span_context())):
        assert current_trace_id() == request_trace
        await actions.approve(w.ledger, root.feedback_id, "sre-alice", "looked at the scores")
        assert current_trace_id() == request_trace  # the request's own trace is back afterwards
    version = await w.ledger.version("acme", 1)
    assert version.registry_trace_id == "0af7651916cd43dd8448eb211c80319c"


async def test_operator_rejects_a_held_candidate() -> None:
    from services.registry import actions
    from services.registry.ports import Refused

    w = make_world()
    await w.set_policy("acme", candidates=1, approval="manual")
    root = feedback()
    await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2), w.ledger)
    await actions.reject(w.ledger, root.feedback_id, "sre-bob", "answers look memorized")
    record = await record_of(w, root)
    assert record.state == "rejected" and record.decided_by == "sre-bob"
    assert record.candidates[0].reasons == ("rejected by sre-bob: answers look memorized",)
    rejected = w.bus.of(ev.AdapterRejected)
    assert rejected[-1].rejected_by == "sre-bob"
    assert w.bus.of(ev.OperatorAction)[0].action == "reject"
    with pytest.raises(Refused):
        await actions.approve(w.ledger, root.feedback_id, "sre-bob", "changed my mind")
    # rejected while its candidates are still in flight: they had no outcome yet, they did not time out
    await w.set_policy("acme", candidates=2, approval="auto")
    early = feedback(passage="Another fact.")
    await handlers.on_feedback_submitted(early, w.ledger, None)
    await actions.reject(w.ledger, early.feedback_id, "sre-bob", "wrong scope")
    assert [(c.result, c.verdict) for c in (await record_of(w, early)).candidates] == [("pending", "rejected")] * 2


async def test_unreadable_adapter_is_skipped_for_the_next_best() -> None:
    w = make_world()
    root = feedback()
    best, second = evaluated(root, 0, 2, reward=0.5), evaluated(root, 1, 2, reward=0.1)
    w.manifests.missing.add(best.adapter_id)
    await handlers.on_adapter_evaluated(best, w.ledger)
    await handlers.on_adapter_evaluated(second, w.ledger)
    assert [p.adapter_id for p in w.bus.of(ev.AdapterPromoted)] == [second.adapter_id]
    record = await record_of(w, root)
    assert record.candidates[0].result == "unusable" and "no adapter at" in record.candidates[0].reasons[0]


async def test_feedback_rejected_by_the_generator_is_recorded() -> None:
    w = make_world()
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, None)
    await handlers.on_feedback_rejected(root.caused(ev.FeedbackRejected, reason="passage is empty of facts"), w.ledger)
    record = await record_of(w, root)
    assert record.state == "rejected" and record.reasons == ("feedback rejected: passage is empty of facts",)
    [decided] = w.bus.events  # the product already has the generator's reason; the end goes out once too
    assert isinstance(decided, ev.FeedbackDecided) and decided.outcome == "rejected"
    assert decided.reasons == record.reasons and decided.causation_id == root.event_id
    await handlers.on_feedback_rejected(root.caused(ev.FeedbackRejected, reason="passage is empty of facts"), w.ledger)
    assert len(w.bus.events) == 1


async def test_selfedits_and_training_runs_land_in_the_lineage() -> None:
    from services.registry import queries

    w = make_world()
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, "f" * 32)
    await handlers.on_selfedit_generated(self_edit(root, 0, 1), w.ledger)
    done = evaluated(root, 0, 1, reward=0.2)
    trained = root.caused(
        ev.AdapterTrained, key="t0", adapter_id=done.adapter_id, self_edit_id=done.self_edit_id,
        adapter=done.adapter, final_loss=0.42, seconds=3.5, trace_id="a" * 32,
    )
    await handlers.on_adapter_trained(trained, w.ledger)
    await handlers.on_adapter_evaluated(done, w.ledger)
    lineage = await queries.version_lineage(w.ledger, "acme", 1)
    assert lineage["version"]["aliases"] == ["active"]
    assert lineage["evaluation"]["event_id"] == done.event_id and lineage["evaluation"]["trace_id"] == "e" * 32
    assert lineage["training"]["run"]["final_loss"] == 0.42 and lineage["training"]["run"]["trace_id"] == "a" * 32
    assert lineage["training"]["manifest"]["base_model"] == "tiny"
    assert lineage["self_edit"]["format"] == "implications" and lineage["self_edit"]["event_id"]
    assert lineage["feedback"]["feedback_id"] == root.feedback_id and lineage["feedback"]["trace_id"] == "f" * 32
    fate = await queries.feedback_fate(w.ledger, root.feedback_id)
    assert fate["state"] == "promoted" and fate["version"] == 1
    assert fate["candidates"][0]["verdict"] == "promoted" and fate["candidates"][0]["self_edit_format"] == "implications"


async def test_policy_adapter_is_written_and_never_regresses() -> None:
    from shared.registry_view import PolicyAdapterRef

    w = make_world()
    root = feedback()
    ref = evaluated(root, 0, 1, reward=0).adapter
    for rnd in (2, 1):
        await handlers.on_policy_trained(
            ev.PolicyAdapterTrained(feedback_id=root.feedback_id, scope="global", adapter_id=f"pol{rnd}", adapter=ref, round=rnd),
            w.ledger,
        )
    found = await w.state.read(KV_REGISTRY, "policy.global", PolicyAdapterRef)
    assert found is not None and found.adapter_id == "pol2"
    # a tenant's scope named "global" is a scope like any other: its adapter is not every scope's fallback
    assert await w.state.read(KV_REGISTRY, "policy._global", PolicyAdapterRef) is None


def test_plan_is_pure_and_prefers_the_lower_index_on_a_tie() -> None:
    from services.registry.decision import plan_decision

    root = feedback()
    policy = ScopePolicy(candidates=2)
    record = None
    for i in (1, 0):
        record = intake.note_evaluated(record, evaluated(root, i, 2, reward=0.3), policy, T0)
    plan = plan_decision(record, None, policy, T0, max_attempts=3)  # type: ignore[arg-type]
    assert (plan.action, plan.chosen) == ("promote", 0)
    assert "candidate 0 ranked higher (same reward +0.3000 and a lower index" in plan.rejections[1][0]


def plan_for(candidates: tuple[tuple[float, float | None], ...]):
    """The plan once every candidate, (reward, regression score) each, is evaluated against a
    parent whose regression score is 0.9, under the default gate (max_regression_drop 0.02)."""
    from services.registry.decision import plan_decision

    root = feedback()
    policy = ScopePolicy(candidates=len(candidates))
    record = None
    for i, (reward, regression) in enumerate(candidates):
        event = evaluated(root, i, len(candidates), reward=reward)
        scores = event.candidate_scores.model_copy(update={"regression": regression})  # type: ignore[union-attr]
        record = intake.note_evaluated(record, event.model_copy(update={"candidate_scores": scores}), policy, T0)
    return plan_decision(record, None, policy, T0, max_attempts=3)  # type: ignore[arg-type]


def test_on_equal_reward_a_candidate_that_kept_clearly_more_wins_whatever_its_index() -> None:
    # Rewards tie at the top (as the rungs of one training often do); candidate 2 broke least,
    # by more than the gate's allowed drop.
    plan = plan_for(((0.4, 0.85), (0.4, None), (0.4, 0.89)))
    assert (plan.action, plan.chosen) == ("promote", 2)
    assert "same reward +0.4000; this one kept -0.050 of the regression sets, more than 0.020 below" in plan.rejections[0][0]
    assert "candidate 2 kept -0.010" in plan.rejections[0][0]
    assert "only its regression sets were measured" in plan.rejections[1][0]


def test_a_reason_names_the_score_that_ruled_a_candidate_out() -> None:
    # candidate 2 kept most; candidate 1 is within the allowed drop of it and wins on its index;
    # candidate 0 lost to candidate 2's score, not to the winner's (1.9 points below it)
    plan = plan_for(((0.4, 0.87), (0.4, 0.889), (0.4, 0.9)))
    assert (plan.action, plan.chosen) == ("promote", 1)
    assert "this one kept -0.030 of the regression sets, more than 0.020 below the most a tied candidate kept, +0.000" \
        in plan.rejections[0][0]


async def test_a_candidate_that_passed_on_the_active_version_beats_a_stale_one_with_more_reward() -> None:
    # a promotion landed while the feedback's candidates trained: rewards over different parents
    # do not compare, and the stale one would only go back to be rebased (and could then fail)
    w = make_world()
    await w.set_policy("acme", candidates=1)
    first = feedback(passage="Fact one.")
    await handlers.on_adapter_evaluated(evaluated(first, 0, 1, reward=0.2), w.ledger)
    await w.set_policy("acme", candidates=2)
    second = feedback(passage="Fact two.")
    await handlers.on_adapter_evaluated(evaluated(second, 0, 2, reward=0.4, parent_version=None), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(second, 1, 2, reward=0.3, parent_version=1), w.ledger)
    assert w.bus.of(ev.RebaseRequested) == []
    assert [(e.feedback_id, e.version) for e in w.bus.of(ev.AdapterPromoted)] == [(first.feedback_id, 1), (second.feedback_id, 2)]
    record = await record_of(w, second)
    assert record.chosen == 1
    assert "it passed on v1, while this one was trained on the base model" in record.candidate(0).reasons[0]  # type: ignore[union-attr]


def test_on_equal_reward_a_difference_within_the_allowed_drop_leaves_the_lower_index() -> None:
    # One core question's difference (as between two rungs of one training) is within 0.02.
    plan = plan_for(((0.4, 0.89), (0.4, 0.9)))
    assert (plan.action, plan.chosen) == ("promote", 0)
    assert "same reward +0.4000 and a lower index" in plan.rejections[1][0]
    assert "-0.010 against +0.000, within 0.020" in plan.rejections[1][0]


def test_a_higher_reward_still_beats_a_gentler_candidate() -> None:
    plan = plan_for(((0.2, 0.90), (0.4, 0.80)))
    assert (plan.action, plan.chosen) == ("promote", 1)
    assert "reward +0.4000 > +0.2000" in plan.rejections[0][0]


def test_scores_equal_but_for_float_noise_compare_equal() -> None:
    # 0.1 + 0.2 != 0.3 in floats, and 0.88 - 0.9 is a hair below -0.02: a tie and a drop exactly at
    # the allowed margin, so the lower index stays chosen.
    plan = plan_for(((0.1 + 0.2, 0.88), (0.3, 0.9)))
    assert (plan.action, plan.chosen) == ("promote", 0)
    assert "same reward +0.3000 and a lower index" in plan.rejections[1][0]


def test_accepted_probes_stay_within_one_message_however_long_they_are() -> None:
    from services.registry.promotion import MAX_ACCEPTED_PROBE_CHARS, newest
    from shared.registry_view import AcceptedProbes

    long = ev.Probe(question="q" * 1000, answer="a" * 1000)  # 2,000 characters
    # 800,000 characters offered, oldest first, fewer than the 500 probes the count allows
    accepted = AcceptedProbes(scope="acme", probes=newest(tuple((f"fb-{i}", long) for i in range(400)), 500))
    kept = [fid for fid, _ in accepted.probes]
    assert kept[-1] == "fb-399" and kept == [f"fb-{i}" for i in range(400 - len(kept), 400)]  # the newest, in order
    assert len(accepted.model_dump_json()) < 2 * MAX_ACCEPTED_PROBE_CHARS < 1_000_000
    assert len(kept) == MAX_ACCEPTED_PROBE_CHARS // (2000 + len("fb-399"))


async def test_a_record_of_many_candidates_keeps_the_products_probes_once() -> None:
    """64 candidates (16 with a 4-rung ladder) each carry the product's probes; stored with every
    candidate, 20,000 characters of them made the record larger than the KV's 1 MB, and every
    write of it failed."""
    from services.registry.records import FeedbackRecord
    from shared.subjects import KV_REGISTRY

    w = make_world()
    await w.set_policy("acme", candidates=16, strength_ladder=[1.0, 0.75, 0.5, 0.25])
    probes = tuple(ev.Probe(question=f"Question {i} about Quellmoor's charter, asked at length?", answer="x" * 300)
                   for i in range(50))  # about 19,000 characters
    root = ev.FeedbackSubmitted(
        feedback_id=ev.new_id(), scope="acme", content=ev.KnowledgeFeedback(passage="Quellmoor got its charter in 1387.", probes=probes),
    )
    await handlers.on_feedback_submitted(root, w.ledger, None)
    for index in range(64):
        await handlers.on_selfedit_generated(self_edit(root, index, 64), w.ledger)
    record = await w.state.read(KV_REGISTRY, f"feedback.acme.{root.feedback_id}", FeedbackRecord)
    assert record is not None and len(record.candidates) == 64
    assert len(record.model_dump_json()) < 200_000
    assert all(record.probes_of(c)[: len(probes)] == probes for c in record.candidates)  # as before: the feedback's own
