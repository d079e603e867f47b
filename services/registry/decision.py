"""The decision state machine, pure: records in, records (with an outbox) out.

A feedback record is ``collecting`` until every candidate ``0..k-1`` has a
result (evaluated, training or evaluation failed, self-edit rejected) or its
deadline passes. Then :func:`plan_decision` picks the best candidate that
passed every gate (highest reward; on a tie, the lowest index unless another
kept clearly more of the regression sets) and says what to do with it:

* ``promote``: its parent is the scope's active version and nothing holds it;
* ``hold``: the scope policy wants approval, or the scope is pinned;
* ``rebase``: it was trained on a version that is no longer active, so it
  goes back to the trainer to be trained on the active one (never promoted
  over it, never dropped);
* ``reject``: nothing passed, or it kept losing the race to newer versions.

Every other candidate is rejected with its reasons. The transition functions
below put the events that announce each step in the record's ``outbox``, in
the same compare-and-set as the step itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from shared import events as ev
from shared.registry_view import ScopePolicy

from .records import Attempt, CandidateRecord, FeedbackRecord, ScopeHead

Action = Literal["wait", "promote", "hold", "rebase", "reject"]


@dataclass(frozen=True)
class Plan:
    action: Action
    chosen: int | None = None
    # candidate index -> why it is rejected
    rejections: dict[int, tuple[str, ...]] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    hold: Literal["manual", "pinned"] | None = None


def active_version(head: ScopeHead | None) -> int | None:
    return head.version if head is not None else None


def describe_version(version: int | None) -> str:
    return f"v{version}" if version is not None else "the base model"


def regression_kept(cand: CandidateRecord) -> float | None:
    """The candidate's regression score minus its parent's (<= 0: what it broke); None unmeasured."""
    mine, parent = cand.candidate_scores, cand.parent_scores
    if mine is None or parent is None or mine.regression is None or parent.regression is None:
        return None
    return mine.regression - parent.regression


def select_best_candidate(candidates: list[CandidateRecord], margin: float = 0.0) -> CandidateRecord | None:
    """Among those that passed every gate: the highest reward; on equal reward (rewards move in
    steps of one probe, so candidates often tie, the ladder's rungs of one training above all)
    the lowest index, unless another kept more than ``margin`` more of the regression sets (core
    and earlier feedback). The margin is the drop the gate allows: within it, the difference is
    one the gate already accepts, and the lower index (the ladder's stronger rung, which tends
    to teach more of what the probes do not ask) wins."""
    passing = [c for c in candidates if c.result == "evaluated" and c.passed]
    if not passing:
        return None
    top = max(_reward(c) for c in passing)
    tied = sorted((c for c in passing if _reward(c) == top), key=lambda c: c.index)
    kept = {c.index: k for c in tied if (k := regression_kept(c)) is not None}
    if not kept:
        return tied[0]
    floor = _settled(max(kept.values()) - margin)
    return next(c for c in tied if c.index in kept and _settled(kept[c.index]) >= floor)


def _reward(cand: CandidateRecord) -> float:
    return _settled(cand.reward) if cand.reward is not None else float("-inf")


def _settled(value: float) -> float:
    """``value`` without float noise, so equal scores compare equal (they are sums of fractions)."""
    return round(value, 9)


def ranked_below(best: CandidateRecord, cand: CandidateRecord, others: list[CandidateRecord], margin: float) -> str:
    """Why a passing candidate lost to the chosen one, in words."""
    if best.parent_version != cand.parent_version:
        return (f"candidate {best.index} was chosen: it passed on {describe_version(best.parent_version)}, while this "
                f"one was trained on {describe_version(cand.parent_version)} (rewards over different parents do not compare)")
    if _reward(best) > _reward(cand):
        return f"candidate {best.index} ranked higher (reward {_signed(best.reward, 4)} > {_signed(cand.reward, 4)})"
    mine, theirs = regression_kept(cand), regression_kept(best)
    if mine is None and theirs is not None:
        return f"candidate {best.index} ranked higher (same reward {_signed(best.reward, 4)}; only its regression sets were measured)"
    if cand.index < best.index:
        tied = [k for c in others if c.result == "evaluated" and c.passed and _reward(c) == _reward(best)
                and c.parent_version == best.parent_version and (k := regression_kept(c)) is not None]
        most = max(tied, default=theirs)
        return (
            f"candidate {best.index} ranked higher (same reward {_signed(best.reward, 4)}; this one kept "
            f"{_signed(mine)} of the regression sets, more than {margin:.3f} below the most a tied candidate kept, "
            f"{_signed(most)}; candidate {best.index} kept {_signed(theirs)})"
        )
    return (
        f"candidate {best.index} ranked higher (same reward {_signed(best.reward, 4)} and a lower index; "
        f"regression sets {_signed(theirs)} against {_signed(mine)}, within {margin:.3f} or better)"
    )


def _signed(value: float | None, digits: int = 3) -> str:
    return "unmeasured" if value is None else f"{value:+.{digits}f}"


def failure_reasons(cand: CandidateRecord) -> tuple[str, ...]:
    if cand.result == "evaluated" and not cand.passed:
        failed = [g.reason or f"gate {g.gate} failed" for g in cand.gates if not g.passed]
        return tuple(dict.fromkeys([*cand.reasons, *failed])) or ("did not pass the evaluation gates",)
    return cand.reasons or (f"candidate {cand.index}: {cand.result.replace('_', ' ')}",)


def plan_decision(
    record: FeedbackRecord,
    head: ScopeHead | None,
    policy: ScopePolicy,
    now: datetime,
    max_attempts: int,
) -> Plan:
    if record.state not in ("collecting", "rebasing"):
        return Plan("wait")
    live = [c for c in record.candidates if not c.decided]
    timed_out = record.deadline_at is not None and now >= record.deadline_at
    complete = record.candidate_count is not None and bool(live) and all(c.result != "pending" for c in live)
    if not complete and not timed_out:
        return Plan("wait")
    rejections: dict[int, tuple[str, ...]] = {}
    for cand in live:
        if cand.result == "pending":
            rejections[cand.index] = (
                f"no outcome within the decision timeout ({policy.decision_timeout_s:g}s)",
            )
    considered = [c for c in live if c.result != "pending"]
    current = active_version(head)
    # A reward is a gain over the candidate's own parent, so candidates trained on different
    # versions (a promotion landed while they trained) do not compare: one that passed on the
    # active version is chosen over any stale one, which would only go back to be rebased.
    best = select_best_candidate([c for c in considered if c.parent_version == current], policy.max_regression_drop) \
        or select_best_candidate(considered, policy.max_regression_drop)
    for cand in considered:
        if best is None or cand.index != best.index:
            if cand.result == "evaluated" and cand.passed and best is not None:
                rejections[cand.index] = (ranked_below(best, cand, considered, policy.max_regression_drop),)
            else:
                rejections[cand.index] = failure_reasons(cand)
    if best is None:
        if not considered:
            reason = (f"no candidate had an outcome within the decision timeout ({policy.decision_timeout_s:g}s): "
                      "generation, training or evaluation did not finish (see seal dead-letters)")
        else:
            unheard = f"; {len(live) - len(considered)} had no outcome in time" if len(considered) < len(live) else ""
            reason = f"none of {len(considered)} candidate(s) with an outcome passed every gate{unheard}"
        return Plan("reject", rejections=rejections, reasons=(reason,))
    if best.parent_version != current:
        if best.attempt >= max_attempts:
            reason = (
                f"trained on {describe_version(best.parent_version)} but the scope moved to "
                f"{describe_version(current)} {best.attempt} time(s); giving up after {max_attempts} attempts"
            )
            rejections[best.index] = (reason,)
            return Plan("reject", rejections=rejections, reasons=(reason,))
        return Plan("rebase", chosen=best.index, rejections=rejections)
    if head is not None and head.pinned:
        by = f" by {head.pinned_by}" if head.pinned_by else ""
        return Plan("hold", best.index, rejections, (f"scope is pinned at v{head.version}{by}",), hold="pinned")
    if policy.approval == "manual":
        return Plan("hold", best.index, rejections, ("scope policy requires approval",), hold="manual")
    return Plan("promote", best.index, rejections)


# ----------------------------------------------------------------- transitions


def _event_id(record: FeedbackRecord, *parts: object) -> str:
    # The scope too: a bus publisher may reuse a feedback id in two scopes, and the second scope's
    # events, under the first's ids, were dropped by JetStream as duplicates.
    return ev.derived_id(record.scope, record.feedback_id, *parts)


def _cause(record: FeedbackRecord, cand: CandidateRecord | None = None) -> str | None:
    if cand is not None and cand.evaluation_event_id:
        return cand.evaluation_event_id
    return record.feedback_event_id


def rejected_event(
    record: FeedbackRecord, cand: CandidateRecord, reasons: tuple[str, ...], by: str | None = None
) -> ev.AdapterRejected:
    return ev.AdapterRejected(
        event_id=_event_id(record, "adapter.rejected", cand.index, cand.attempt, cand.adapter_id),
        feedback_id=record.feedback_id,
        scope=record.scope,
        causation_id=_cause(record, cand),
        adapter_id=cand.adapter_id,
        self_edit_id=cand.self_edit_id,
        reasons=reasons or ("rejected",),
        rejected_by=by,
    )


def with_outbox(record: FeedbackRecord, *events: ev.Event) -> FeedbackRecord:
    known = {item["event_id"] for item in record.outbox}
    added = tuple(e.model_dump(mode="json") for e in events if e.event_id not in known)
    return record.model_copy(update={"outbox": record.outbox + added})


def apply_rejections(
    record: FeedbackRecord, rejections: dict[int, tuple[str, ...]], by: str | None = None
) -> FeedbackRecord:
    for index, reasons in sorted(rejections.items()):
        cand = record.candidate(index)
        if cand is None or cand.decided:
            continue
        # Without an outcome: timed out, unless an operator decided first (then it simply had none yet).
        result = "timed_out" if cand.result == "pending" and by is None else cand.result
        updated = cand.model_copy(update={"verdict": "rejected", "result": result, "reasons": reasons})
        record = with_outbox(record.with_candidate(updated), rejected_event(record, updated, reasons, by))
    return record


def to_promoting(record: FeedbackRecord, plan: Plan, now: datetime, by: str | None = None) -> FeedbackRecord:
    record = apply_rejections(record, plan.rejections)
    return record.model_copy(
        update={"state": "promoting", "chosen": plan.chosen, "decided_at": now, "decided_by": by, "hold": None}
    )


def to_held(record: FeedbackRecord, plan: Plan, now: datetime) -> FeedbackRecord:
    record = apply_rejections(record, plan.rejections)
    cand = record.candidate(plan.chosen)  # type: ignore[arg-type]
    assert cand is not None and cand.adapter is not None and cand.adapter_id is not None
    cand = cand.model_copy(update={"verdict": "awaiting_approval", "reasons": plan.reasons})
    event = ev.AdapterAwaitingApproval(
        event_id=_event_id(record, "adapter.awaiting_approval", cand.index, cand.attempt, plan.hold),
        feedback_id=record.feedback_id,
        scope=record.scope,
        causation_id=_cause(record, cand),
        adapter_id=cand.adapter_id,
        adapter=cand.adapter,
        reward=cand.reward,
    )
    record = record.with_candidate(cand).model_copy(
        update={"state": "awaiting_approval", "chosen": cand.index, "hold": plan.hold, "reasons": plan.reasons}
    )
    return with_outbox(record, event)


def reopen(record: FeedbackRecord) -> FeedbackRecord:
    """A held record goes back to collecting so it is decided again (after an unpin)."""
    if record.state != "awaiting_approval" or record.chosen is None:
        return record
    cand = record.candidate(record.chosen)
    assert cand is not None
    cand = cand.model_copy(update={"verdict": None, "reasons": ()})
    return record.with_candidate(cand).model_copy(
        update={"state": "collecting", "chosen": None, "hold": None, "reasons": ()}
    )


def to_rebasing(
    record: FeedbackRecord,
    plan: Plan,
    self_edit: ev.SelfEdit,
    probes: tuple[ev.Probe, ...],
    head: ScopeHead | None,
    now: datetime,
    timeout_s: float,
) -> FeedbackRecord:
    record = apply_rejections(record, plan.rejections)
    cand = record.candidate(plan.chosen)  # type: ignore[arg-type]
    assert cand is not None
    target = active_version(head)
    earlier = Attempt(
        attempt=cand.attempt,
        adapter_id=cand.adapter_id,
        parent_version=cand.parent_version,
        reward=cand.reward,
        passed=cand.passed,
        outcome=f"trained on {describe_version(cand.parent_version)}; rebased onto {describe_version(target)}",
    )
    fresh = CandidateRecord(
        index=cand.index,
        attempt=cand.attempt + 1,
        self_edit_id=cand.self_edit_id,
        earlier_attempts=(*cand.earlier_attempts, earlier),
        product_probes=cand.product_probes,
    )
    event = ev.RebaseRequested(
        event_id=_event_id(record, "training.rebase_requested", cand.index, fresh.attempt),
        feedback_id=record.feedback_id,
        scope=record.scope,
        causation_id=_cause(record, cand),
        self_edit=self_edit,
        probes=probes,
        parent_version=target,
        attempt=fresh.attempt,
    )
    record = record.with_candidate(fresh).model_copy(
        update={
            "state": "rebasing",
            "chosen": None,
            "hold": None,
            "deadline_at": now + timedelta(seconds=timeout_s),
            "reasons": (earlier.outcome,),
        }
    )
    return with_outbox(record, event)


def to_rejected(
    record: FeedbackRecord, plan: Plan, now: datetime, by: str | None = None
) -> FeedbackRecord:
    rejections = dict(plan.rejections)
    for cand in record.candidates:
        if not cand.decided and cand.index not in rejections:
            rejections[cand.index] = plan.reasons
    record = apply_rejections(record, rejections, by)
    record = record.model_copy(
        update={"state": "rejected", "reasons": plan.reasons, "decided_at": now, "decided_by": by, "chosen": None}
    )
    return with_outbox(record, decided_event(record))


def decided_event(record: FeedbackRecord) -> ev.FeedbackDecided:
    """The one event that says how a feedback ended (its record promoted or rejected)."""
    cand = record.candidate(record.chosen) if record.state == "promoted" and record.chosen is not None else None
    return ev.FeedbackDecided(
        event_id=_event_id(record, "feedback.decided"),
        feedback_id=record.feedback_id,
        scope=record.scope,
        causation_id=_cause(record, cand),
        outcome="promoted" if record.state == "promoted" else "rejected",
        version=record.version if record.state == "promoted" else None,
        adapter_id=cand.adapter_id if cand is not None else None,
        reasons=record.reasons if record.state == "rejected" else (),
        decided_by=record.decided_by,
    )


def to_promoted(
    record: FeedbackRecord, version: int, previous: int | None, now: datetime, by: str | None
) -> FeedbackRecord:
    cand = record.candidate(record.chosen)  # type: ignore[arg-type]
    assert cand is not None and cand.adapter is not None and cand.adapter_id is not None
    cand = cand.model_copy(update={"verdict": "promoted", "reasons": ()})
    event = ev.AdapterPromoted(
        event_id=_event_id(record, "adapter.promoted", cand.index, cand.attempt, version),
        feedback_id=record.feedback_id,
        scope=record.scope,
        causation_id=_cause(record, cand),
        adapter_id=cand.adapter_id,
        version=version,
        previous_version=previous,
        adapter=cand.adapter,
        reward=cand.reward,
        approved_by=by,
    )
    record = record.with_candidate(cand).model_copy(
        update={"state": "promoted", "version": version, "decided_at": record.decided_at or now, "reasons": ()}
    )
    return with_outbox(record, event, decided_event(record))
