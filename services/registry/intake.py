"""Recording what the pipeline reports about a feedback, pure.

Each ``note_*`` function takes the record as it is in KV (None if this is
the first thing heard about the feedback) and returns the record to write,
or None when there is nothing to change (a redelivered event). Events may
arrive in any order: a candidate's evaluation can come before the registry
saw the feedback itself, so any of them may create the record.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

from shared import events as ev
from shared.registry_view import ScopePolicy

from .decision import decided_event, rejected_event, with_outbox
from .records import Attempt, CandidateRecord, FeedbackRecord, TrainingRun

SUMMARY_CHARS = 240

log = logging.getLogger(__name__)


def new_record(event: ev.Event, policy: ScopePolicy, now: datetime) -> FeedbackRecord:
    return FeedbackRecord(
        feedback_id=event.feedback_id,
        scope=event.scope,
        first_seen_at=now,
        deadline_at=now + timedelta(seconds=policy.decision_timeout_s),
    )


def summarize(content: ev.KnowledgeFeedback | ev.CorrectionFeedback | ev.PreferenceFeedback) -> str:
    if isinstance(content, ev.KnowledgeFeedback):
        text = (f"{content.title}: " if content.title else "") + content.passage
    elif isinstance(content, ev.CorrectionFeedback):
        text = f"{content.question} -> {content.right_answer}"
    else:
        text = content.instruction
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def content_digest(content: ev.KnowledgeFeedback | ev.CorrectionFeedback | ev.PreferenceFeedback) -> str:
    return hashlib.sha256(content.model_dump_json().encode()).hexdigest()


def feedback_probes(content: ev.KnowledgeFeedback | ev.CorrectionFeedback | ev.PreferenceFeedback) -> tuple[ev.Probe, ...]:
    if isinstance(content, ev.KnowledgeFeedback):
        return tuple(p for p in content.probes if p.source == "product")
    if isinstance(content, ev.CorrectionFeedback):
        return (ev.Probe(question=content.question, answer=content.right_answer),)
    return ()


def note_feedback(
    record: FeedbackRecord | None,
    event: ev.FeedbackSubmitted,
    policy: ScopePolicy,
    now: datetime,
    trace_id: str | None,
) -> FeedbackRecord | None:
    if record is not None and record.feedback_event_id == event.event_id:
        return None
    digest = content_digest(event.content)
    if record is not None and record.feedback_event_id is not None:
        # Another event of a feedback already recorded: the generator takes the first one only,
        # so the record keeps it (overwriting would show content that was never trained).
        if record.content_digest is not None and record.content_digest != digest:
            log.warning("feedback %s of scope %s was sent again with other content (event %s); the first "
                        "(event %s) stands: a product must give new feedback a new id",
                        event.feedback_id, event.scope, event.event_id, record.feedback_event_id)
        return None
    record = record or new_record(event, policy, now)
    # The clock starts when the registry first heard of the feedback, not at the
    # producer's timestamp: a skewed clock or a replayed event must not time out at once.
    started = record.first_seen_at
    update: dict = {
        "kind": event.content.kind,
        "summary": summarize(event.content),
        "submitted_by": event.submitted_by,
        "submitted_at": event.occurred_at,
        "feedback_event_id": event.event_id,
        "content_digest": digest,
        "trace_id": trace_id,
        "feedback_probes": feedback_probes(event.content),
    }
    if record.state == "collecting":
        update["deadline_at"] = started + timedelta(seconds=policy.decision_timeout_s)
    record = record.model_copy(update=update)
    if not record.count_from_generator and record.state == "collecting":
        record = record.model_copy(update={"candidate_count": policy.candidates}).with_count(policy.candidates)
    return record


def note_feedback_rejected(
    record: FeedbackRecord | None, event: ev.FeedbackRejected, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    record = record or new_record(event, policy, now)
    if not record.is_open or record.state != "collecting":
        return None
    reason = f"feedback rejected: {event.reason}"
    candidates = tuple(
        c.model_copy(update={"verdict": "rejected", "reasons": (reason,)}) if not c.decided else c
        for c in record.candidates
    )
    record = record.model_copy(
        update={"state": "rejected", "reasons": (reason,), "decided_at": now, "candidates": candidates}
    )
    return with_outbox(record, decided_event(record))


def _candidate_for(
    record: FeedbackRecord | None, event: ev.Event, index: int, count: int, policy: ScopePolicy, now: datetime
) -> tuple[FeedbackRecord, CandidateRecord]:
    record = record or new_record(event, policy, now)
    if not record.count_from_generator or (record.candidate_count or 0) < count:
        # The generator's count wins over the policy's guess: drop untouched placeholders.
        kept = tuple(c for c in record.candidates if c.index < count or c != CandidateRecord(index=c.index))
        record = record.model_copy(update={"candidate_count": count, "count_from_generator": True, "candidates": kept})
    record = record.with_count(max(count, index + 1))
    cand = record.candidate(index)
    assert cand is not None
    return record, cand


def _late(record: FeedbackRecord, cand: CandidateRecord) -> bool:
    return cand.decided or not record.is_open


def note_selfedit_rejected(
    record: FeedbackRecord | None, event: ev.SelfEditRejected, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    record, cand = _candidate_for(record, event, event.candidate_index, event.candidate_count, policy, now)
    if cand.result != "pending" or _late(record, cand):
        return None
    cand = cand.model_copy(
        update={
            "result": "selfedit_rejected",
            "self_edit_id": event.self_edit_id,
            "reasons": tuple(f"self-edit rejected: {r}" for r in event.reasons),
        }
    )
    return record.with_candidate(cand)


def _unless_the_feedbacks(record: FeedbackRecord, product: tuple[ev.Probe, ...]) -> tuple[ev.Probe, ...]:
    """A candidate's product probes, or none where they are the feedback's own (``probes_of`` falls
    back to those): kept once per record, not once per candidate, a record of 64 candidates with a
    product's 20,000 characters of probes stays far inside the KV's 1 MB."""
    return () if product and product == record.feedback_probes else product


def note_selfedit(
    record: FeedbackRecord | None, event: ev.SelfEditGenerated, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    index, count = event.self_edit.candidate_index, event.self_edit.candidate_count
    record, cand = _candidate_for(record, event, index, count, policy, now)
    product, own = ev.probes_by_source(event.probes)
    product = _unless_the_feedbacks(record, product)
    if (cand.self_edit_id, cand.product_probes, cand.self_generated_probes) == (event.self_edit.self_edit_id, product, own):
        return None
    return record.with_candidate(
        cand.model_copy(
            update={"self_edit_id": event.self_edit.self_edit_id, "product_probes": product, "self_generated_probes": own}
        )
    )


def note_trained(
    record: FeedbackRecord | None, event: ev.AdapterTrained, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    record, cand = _candidate_for(record, event, event.candidate_index, event.candidate_count, policy, now)
    if cand.training is not None and cand.training.adapter_id == event.adapter_id:
        return None
    current = cand.result == "pending" or cand.adapter_id == event.adapter_id
    if not current or any(a.adapter_id == event.adapter_id for a in cand.earlier_attempts):
        return None
    run = TrainingRun(
        adapter_id=event.adapter_id,
        event_id=event.event_id,
        parent_version=event.parent_version,
        parent_adapter_id=event.parent_adapter_id,
        final_loss=event.final_loss,
        seconds=event.seconds,
        trace_id=event.trace_id,
    )
    return record.with_candidate(cand.model_copy(update={"training": run, "self_edit_id": event.self_edit_id}))


def note_training_failed(
    record: FeedbackRecord | None, event: ev.AdapterTrainingFailed, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    record, cand = _candidate_for(record, event, event.candidate_index, event.candidate_count, policy, now)
    if cand.result != "pending" or _late(record, cand):
        return None
    cand = cand.model_copy(
        update={
            "result": "training_failed",
            "self_edit_id": event.self_edit_id,
            "reasons": (f"training failed: {event.reason}",),
        }
    )
    return record.with_candidate(cand)


def note_evaluation_failed(
    record: FeedbackRecord | None, event: ev.AdapterEvaluationFailed, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    record, cand = _candidate_for(record, event, event.candidate_index, event.candidate_count, policy, now)
    if cand.result != "pending" or _late(record, cand) or cand.known_adapter(event.adapter_id):
        return None
    cand = cand.model_copy(
        update={
            "result": "evaluation_failed",
            "adapter_id": event.adapter_id,
            "self_edit_id": event.self_edit_id,
            "reasons": (f"evaluation failed: {event.reason}",),
        }
    )
    return record.with_candidate(cand)


def note_evaluated(
    record: FeedbackRecord | None, event: ev.AdapterEvaluated, policy: ScopePolicy, now: datetime
) -> FeedbackRecord | None:
    """Record an evaluation. One that arrives after its candidate was decided
    (a timeout) is kept for the lineage and rejected at once, with an event."""
    record, cand = _candidate_for(record, event, event.candidate_index, event.candidate_count, policy, now)
    if cand.known_adapter(event.adapter_id):
        return None  # redelivered, or an earlier attempt's evaluation
    product, own = ev.probes_by_source(event.probes)
    evaluated = cand.model_copy(
        update={
            "result": "evaluated",
            "self_edit_id": event.self_edit_id,
            "adapter_id": event.adapter_id,
            "adapter": event.adapter,
            "parent_version": event.parent_version,
            "parent_adapter_id": event.parent_adapter_id,
            "reward": event.reward,
            "passed": event.passed,
            "candidate_scores": event.candidate_scores,
            "parent_scores": event.parent_scores,
            "gates": event.gates,
            "reasons": event.reasons,
            "evaluation_event_id": event.event_id,
            "reported_at": now,
            "trace_id": event.trace_id,
            "product_probes": _unless_the_feedbacks(record, product) or cand.product_probes,
            "self_generated_probes": own or cand.self_generated_probes,
        }
    )
    if cand.result == "pending" and not _late(record, cand):
        return record.with_candidate(evaluated)
    if not cand.decided and record.is_open:
        return None  # a second, different result for an undecided candidate: keep the first
    reasons = (f"evaluated after the feedback was decided ({record.state}); not considered",)
    late = evaluated.model_copy(update={"verdict": "rejected", "reasons": reasons})
    # The decided candidate stays as it was; the late one is recorded as an extra attempt.
    kept = cand.model_copy(
        update={
            "earlier_attempts": (
                *cand.earlier_attempts,
                Attempt(
                    attempt=cand.attempt,
                    adapter_id=event.adapter_id,
                    parent_version=event.parent_version,
                    reward=event.reward,
                    passed=event.passed,
                    outcome=reasons[0],
                ),
            )
        }
    )
    return with_outbox(record.with_candidate(kept), rejected_event(record, late, reasons))
