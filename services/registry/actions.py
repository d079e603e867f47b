"""What an operator can do: approve, reject, roll back, pin, unpin, set a scope's policy.

Each action is recorded in the audit stream as an :class:`OperatorAction`
with who and why. Actions carry a request id (the CLI makes one per call), so
an operator who retries after a timeout gets the same events, not a second
rollback.
"""

from __future__ import annotations

import json
from typing import Any

from shared import events as ev
from shared.registry_view import ScopePolicy, UnreadableRecord
from shared.store import AdapterNotFound, IntegrityError
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS

from . import decision as dc
from .ledger import Ledger
from .ports import NotFound, Refused
from .records import FeedbackRecord, Marker, ScopeHead, head_key, head_outbox_key


def _operator_action(
    key: object,
    feedback_id: str,
    scope: str,
    action: str,
    operator: str,
    reason: str,
    **fields: object,
) -> ev.OperatorAction:
    return ev.OperatorAction(
        event_id=ev.derived_id("operator", key, action),
        feedback_id=feedback_id,
        scope=scope,
        action=action,  # type: ignore[arg-type]
        operator=operator,
        reason=reason,
        **fields,  # type: ignore[arg-type]
    )


async def approve(
    ledger: Ledger, feedback_id: str, operator: str, reason: str, scope: str | None = None
) -> FeedbackRecord:
    """Promote the candidate a feedback is held with. If the active version moved
    since it was trained, it is rebased (and held again when it comes back)."""
    record = await ledger.find_record(feedback_id, scope)
    if record.state in ("promoting", "promoted") and record.decided_by == operator:
        # This operator's approval went through already: the CLI's retry after a timeout or a
        # 5xx gets the outcome, not a refusal for a change it made itself.
        return record
    if record.state != "awaiting_approval" or record.chosen is None:
        raise Refused(f"feedback {feedback_id} is {record.state}, not awaiting approval")
    head = await ledger.head(record.scope)
    if head is not None and head.pinned:
        raise Refused(f"scope {record.scope} is pinned at v{head.version} by {head.pinned_by}; unpin it first")
    chosen = record.candidate(record.chosen)
    assert chosen is not None and chosen.adapter is not None
    await _usable(ledger, chosen.adapter, f"the held candidate's adapter {chosen.adapter_id}", "reject this feedback")
    audit = _operator_action(
        (record.scope, feedback_id, chosen.index, chosen.attempt, chosen.adapter_id),
        feedback_id,
        record.scope,
        "approve",
        operator,
        reason,
        adapter_id=chosen.adapter_id,
        causation_id=chosen.evaluation_event_id,
    )
    now = ledger.ports.clock()

    def change(current: FeedbackRecord | None) -> FeedbackRecord | None:
        if current is None or current.state != "awaiting_approval" or current.chosen != chosen.index:
            return None
        cand = current.candidate(chosen.index)
        assert cand is not None
        moved = current.with_candidate(cand.model_copy(update={"verdict": None, "reasons": ()})).model_copy(
            update={"state": "promoting", "decided_by": operator, "decided_at": now, "hold": None, "reasons": ()}
        )
        return dc.with_outbox(moved, audit)

    updated = await ledger._update(record.scope, feedback_id, change)
    if updated is None or not any(i["event_id"] == audit.event_id for i in updated.outbox):
        raise Refused(f"feedback {feedback_id} changed while approving it; look again")
    return await ledger.settle(record.scope, feedback_id) or updated


async def reject(
    ledger: Ledger, feedback_id: str, operator: str, reason: str, scope: str | None = None
) -> FeedbackRecord:
    """Reject a feedback that is held or still in flight, with every candidate it has."""
    record = await ledger.find_record(feedback_id, scope)
    rejectable = ("collecting", "rebasing", "awaiting_approval")
    if record.state == "rejected" and record.decided_by == operator:
        return record  # this operator's rejection went through already (a retried request)
    if record.state not in rejectable:
        raise Refused(f"feedback {feedback_id} is {record.state}; only held or undecided feedback can be rejected")
    audit = _operator_action(
        (record.scope, feedback_id, record.state), feedback_id, record.scope, "reject", operator, reason
    )
    plan = dc.Plan("reject", reasons=(f"rejected by {operator}: {reason}",))
    now = ledger.ports.clock()

    def change(current: FeedbackRecord | None) -> FeedbackRecord | None:
        if current is None or current.state not in rejectable:
            return None
        if current.state == "awaiting_approval":
            current = dc.reopen(current)
        return dc.with_outbox(dc.to_rejected(current, plan, now, by=operator), audit)

    updated = await ledger._update(record.scope, feedback_id, change)
    if updated is None or updated.state != "rejected":
        raise Refused(f"feedback {feedback_id} changed while rejecting it; look again")
    return await ledger.settle(record.scope, feedback_id) or updated


async def rollback(
    ledger: Ledger, scope: str, to_version: int, operator: str, reason: str, request_id: str
) -> ScopeHead:
    """Make an earlier (or any other existing) version active again."""
    target = await ledger.version(scope, to_version)
    await _usable(ledger, target.adapter, f"v{to_version}'s adapter {target.adapter_id}", "roll back to another version")
    now = ledger.ports.clock()
    outcome: dict[str, object] = {}

    audit = _operator_action(
        request_id, target.feedback_id, scope, "rollback", operator, reason,
        target_version=to_version, adapter_id=target.adapter_id,
    )

    def change(head: ScopeHead | None) -> ScopeHead | None:
        outcome.clear()
        if head is None:
            outcome["missing"] = True
            return None
        if head.handled(request_id):  # a retry: what it announced goes out with the flush below
            return None
        if head.version == to_version:
            outcome["same"] = True
            return None
        rolled_back = ev.AdapterRolledBack(
            event_id=ev.derived_id("operator", request_id, "adapter.rolled_back"),
            feedback_id=target.feedback_id,
            scope=scope,
            causation_id=audit.event_id,
            from_version=head.version,
            to_version=to_version,
            operator=operator,
            reason=reason,
        )
        return head.model_copy(
            update={
                "version": to_version,
                "adapter_id": target.adapter_id,
                "adapter": target.adapter,
                "feedback_id": target.feedback_id,
                "previous_version": head.version,
                **head.remembering(request_id),
                "updated_at": now,
                "outbox": (*head.outbox, audit.model_dump(mode="json"), rolled_back.model_dump(mode="json")),
            }
        )

    marker = head_outbox_key(scope, request_id)
    await ledger.ports.state.put(KV_REGISTRY, marker, Marker(at=now))  # before: a crash after is swept
    head = await ledger.ports.state.compare_and_set(KV_REGISTRY, head_key(scope), ScopeHead, change)
    if outcome.get("missing") or head is None:
        await ledger.ports.state.delete(KV_REGISTRY, marker)
        raise NotFound(f"scope {scope!r} has no active version to roll back from")
    if outcome.get("same"):
        await ledger.flush_head(scope)  # an earlier action's events whose publish failed
        await ledger.ports.state.delete(KV_REGISTRY, marker)
        raise Refused(f"v{to_version} is already the active version of {scope}")
    # From the version active when it runs: a promotion landing meanwhile keeps its probes.
    await ledger.rebuild_probes(scope)
    head = await ledger.flush_head(scope) or head
    await ledger.ports.state.delete(KV_REGISTRY, marker)
    return head


async def _usable(ledger: Ledger, ref: ev.ManifestRef, what: str, instead: str) -> None:
    """Refuse an operator's action that would make an adapter active which does not read back
    intact from the store (gone, or its files not what its manifest says)."""
    try:
        await ledger.ports.manifests.usable(ref)
    except (IntegrityError, AdapterNotFound) as exc:
        raise Refused(f"{what} cannot be used ({exc}); {instead}") from exc


async def set_pin(
    ledger: Ledger, scope: str, pinned: bool, operator: str, reason: str, request_id: str
) -> ScopeHead:
    """Pin: hold every promotion of the scope for approval until unpinned.
    Unpinning decides again what was held only because of the pin."""
    now = ledger.ports.clock()
    outcome: dict[str, object] = {}

    def change(head: ScopeHead | None) -> ScopeHead | None:
        outcome.clear()
        if head is None:
            outcome["missing"] = True
            return None
        if head.handled(request_id):  # a retry: what it announced goes out with the flush below
            return None
        if head.pinned == pinned:
            outcome["same"] = True
            return None
        audit = _operator_action(
            request_id, head.feedback_id or f"scope-{scope}", scope, "pin" if pinned else "unpin", operator, reason,
            target_version=head.version, adapter_id=head.adapter_id,
        )
        return head.model_copy(
            update={
                "pinned": pinned,
                "pinned_by": operator if pinned else None,
                "pin_reason": reason if pinned else None,
                **head.remembering(request_id),
                "updated_at": now,
                "outbox": (*head.outbox, audit.model_dump(mode="json")),
            }
        )

    marker = head_outbox_key(scope, request_id)
    await ledger.ports.state.put(KV_REGISTRY, marker, Marker(at=now))  # before: a crash after is swept
    head = await ledger.ports.state.compare_and_set(KV_REGISTRY, head_key(scope), ScopeHead, change)
    if outcome.get("missing") or head is None:
        await ledger.ports.state.delete(KV_REGISTRY, marker)
        raise NotFound(f"scope {scope!r} has no active version to pin")
    if outcome.get("same"):
        await ledger.flush_head(scope)  # an earlier action's events whose publish failed
        await ledger.ports.state.delete(KV_REGISTRY, marker)
        raise Refused(f"scope {scope} is already {'pinned' if pinned else 'unpinned'}")
    head = await ledger.flush_head(scope) or head
    await ledger.ports.state.delete(KV_REGISTRY, marker)
    if not pinned:
        for record in await held_records(ledger, scope):
            if record.hold == "pinned":
                await ledger.reopen_pinned(scope, record.feedback_id)
                await ledger.settle(scope, record.feedback_id)
    return head


async def held_records(ledger: Ledger, scope: str) -> list[FeedbackRecord]:
    markers = await ledger.ports.state.entries(KV_REGISTRY, f"open.{scope}.*", Marker)
    records = []
    for marker in markers.values():
        if marker.feedback_id:
            record = await ledger.record(scope, marker.feedback_id)
            if record is not None and record.state == "awaiting_approval":
                records.append(record)
    return records


async def set_policy(
    ledger: Ledger,
    scope: str,
    changes: dict[str, Any] | ScopePolicy,
    operator: str | None = None,
    reason: str = "not given",
    *,
    replace: bool = False,
) -> ScopePolicy:
    """Merge ``changes`` into the scope's policy as it is stored at the write (two operators
    changing different settings at once both keep theirs); an operator's change is audited.

    ``replace`` starts from the defaults instead of the stored policy, and writes over a stored
    policy that no longer parses (damaged, or written by a newer registry): the way to repair it."""
    outcome: dict[str, ScopePolicy] = {}
    audit = None
    if operator is not None:
        # Built (and so validated: a blank operator is refused) before anything is written.
        shown = json.dumps(changes.model_dump(mode="json") if isinstance(changes, ScopePolicy) else changes,
                           sort_keys=True, default=str)
        audit = _operator_action(
            (scope, shown, replace, ledger.ports.clock().isoformat()), f"scope-{scope}", scope, "set_policy", operator,
            f"{reason} ({'replaced by the defaults with' if replace else 'changed'}: {shown})"[:2000],
        )

    def change(current: ScopePolicy | None) -> ScopePolicy | None:
        merged = merged_policy(ScopePolicy() if replace or current is None else current, changes)
        outcome["policy"] = merged
        return None if current == merged else merged

    try:
        stored = await ledger.ports.state.compare_and_set(
            KV_SCOPE_SETTINGS, scope, ScopePolicy, change, unreadable_as_absent=replace
        )
    except UnreadableRecord as exc:
        raise Refused(f"{exc}. A change cannot be merged into it: replace the whole policy (seal scope-policy set "
                      f"--replace, or ?replace=true), which starts from the defaults") from None
    if audit is not None:
        await ledger.ports.publish(audit)
    return stored or outcome["policy"]


def merged_policy(current: ScopePolicy, changes: dict[str, Any] | ScopePolicy) -> ScopePolicy:
    """``changes`` over ``current``, validated as a whole. Nested settings merge too:
    {"default_directives": {"epochs": 5}} changes the epochs and keeps the learning rate and the
    rank (it used to reset them to the model's defaults). A whole policy replaces the current one."""
    if isinstance(changes, ScopePolicy):
        return changes
    now = current.model_dump(mode="json")
    return ScopePolicy.model_validate({
        name: {**now[name], **value} if isinstance(value, dict) and isinstance(now.get(name), dict) else value
        for name, value in {**now, **changes}.items()
    })
