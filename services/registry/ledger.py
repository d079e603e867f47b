"""The ledger: feedback records in KV, decisions applied step by step, events out.

Each step is one compare-and-set on one key and is safe to run again:

1. an event from the pipeline is noted on the feedback record (:mod:`.intake`);
2. :meth:`Ledger.settle` plans the decision (:mod:`.decision`) and moves the
   record to ``promoting``, ``awaiting_approval``, ``rebasing`` or ``rejected``,
   with the events that announce it in the record's outbox;
3. a ``promoting`` record moves the scope head (``active.<scope>``; :mod:`.promoting`): the
   commit point. The head remembers recent promotions by adapter id, so a
   re-run after a crash finds its own promotion instead of promoting twice;
   a head that moved under the candidate sends it to be rebased instead;
4. the version record and accepted probes are written, the record becomes
   ``promoted``;
5. the outbox is published (event ids are deterministic, so a re-publish is
   dropped by JetStream) and then emptied.

A crash anywhere leaves a record that the next redelivery or the periodic
sweep carries on from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry import context, trace

from shared import events as ev
from shared.registry_view import (
    PolicyAdapterRef,
    ScopePolicy,
    policy_key,
)
from shared.store import AdapterManifest, AdapterNotFound, IntegrityError
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS
from shared.telemetry import feedback_context

from . import decision as dc
from . import head_outbox, promoting
from . import outer_loop as ol
from .ports import NotFound, Ports, Refused
from .records import (
    FeedbackRecord,
    Marker,
    ScopeHead,
    SelfEditRecord,
    VersionRecord,
    arrival_key,
    feedback_key,
    head_key,
    key_token,
    legacy_selfedit_key,
    open_key,
    seen_key,
    selfedit_key,
    version_key,
    without_published,
)
from .settings import RegistryConfig

log = logging.getLogger(__name__)

MAX_STEPS = 12


def unrebasable(plan: dc.Plan) -> dc.Plan:
    reason = "its self-edit is no longer available to train it again on the active version"
    return dc.Plan(
        "reject",
        rejections={**plan.rejections, plan.chosen: (reason,)},  # type: ignore[dict-item]
        reasons=(f"the chosen candidate could not be rebased: {reason}",),
    )


@dataclass
class Ledger:
    ports: Ports
    config: RegistryConfig = field(default_factory=RegistryConfig)
    _locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ reads

    async def head(self, scope: str) -> ScopeHead | None:
        return await self.ports.state.read(KV_REGISTRY, head_key(scope), ScopeHead)

    async def policy(self, scope: str) -> ScopePolicy:
        found = await self.ports.state.read(KV_SCOPE_SETTINGS, scope, ScopePolicy)
        return found or ScopePolicy()

    async def record(self, scope: str, feedback_id: str) -> FeedbackRecord | None:
        return await self.ports.state.read(KV_REGISTRY, feedback_key(scope, feedback_id), FeedbackRecord)

    async def records_of(self, feedback_id: str) -> list[FeedbackRecord]:
        """Every scope's record of this feedback id: one, unless a product broke the id's uniqueness."""
        found = await self.ports.state.entries(KV_REGISTRY, f"feedback.*.{key_token(feedback_id)}", FeedbackRecord)
        return sorted(found.values(), key=lambda r: r.scope)

    async def find_record(self, feedback_id: str, scope: str | None = None) -> FeedbackRecord:
        """The record of a feedback id; ``scope`` picks one where a product broke the ids' uniqueness."""
        found = [r for r in await self.records_of(feedback_id) if scope is None or r.scope == scope]
        if not found and scope is not None:
            raise NotFound(f"no feedback {feedback_id!r} is known to the registry in scope {scope!r}")
        if not found:
            raise NotFound(f"no feedback {feedback_id!r} is known to the registry: just sent, it may not have "
                           "been read yet (ask again in a few seconds); if it stays unknown, the platform could not "
                           "read it (an invalid scope or id, say): an operator finds why in seal dead-letters")
        if len(found) > 1:
            # Acting on one of them at random could approve or reject the wrong product's feedback.
            scopes = ", ".join(r.scope for r in found)
            raise Refused(f"feedback id {feedback_id!r} was sent to several scopes ({scopes}); feedback ids must be "
                          "unique across the platform, so the registry cannot tell which one is meant: name the "
                          "scope (--scope, or ?scope= over HTTP)")
        return found[0]

    async def version(self, scope: str, version: int) -> VersionRecord:
        found = await self.ports.state.read(KV_REGISTRY, version_key(scope, version), VersionRecord)
        if found is None:
            raise NotFound(f"scope {scope!r} has no version {version}")
        return found

    async def self_edit(self, scope: str, feedback_id: str, index: int) -> SelfEditRecord | None:
        found = await self.ports.state.read(KV_REGISTRY, selfedit_key(scope, feedback_id, index), SelfEditRecord)
        if found is None:
            # Written by a registry from before scoped keys: the same feedback id in another
            # scope shared its key, so it is this scope's only if the record says so.
            legacy = await self.ports.state.read(KV_REGISTRY, legacy_selfedit_key(feedback_id, index), SelfEditRecord)
            found = legacy if legacy is not None and legacy.scope == scope else None
        return found

    # ----------------------------------------------------------------- intake

    async def note(self, event: ev.Event, note: Callable[..., FeedbackRecord | None], *extra: Any) -> None:
        """Record one pipeline event on its feedback record, then decide what follows."""
        policy = await self.policy(event.scope)
        now = self.ports.clock()
        await self._mark(event.scope, event.feedback_id, now)

        def change(record: FeedbackRecord | None) -> FeedbackRecord | None:
            return note(record, event, policy, now, *extra)

        await self._update(event.scope, event.feedback_id, change)
        await self.settle(event.scope, event.feedback_id)

    async def note_selfedit(self, event: ev.SelfEditGenerated) -> None:
        record = SelfEditRecord(
            feedback_id=event.feedback_id,
            scope=event.scope,
            event_id=event.event_id,
            self_edit=event.self_edit,
            probes=event.probes,
            generator_adapter=event.generator_adapter,
            generator_prompt=event.generator_prompt,
        )
        try:
            await self.ports.state.put(
                KV_REGISTRY, selfedit_key(event.scope, event.feedback_id, event.self_edit.candidate_index), record
            )
        except Exception as exc:  # noqa: BLE001 - too large for KV: the manifest keeps it too
            if "payload" not in str(exc).lower():
                raise
            log.warning("self-edit %s not kept in KV (%s); rebase will read the manifest", event.self_edit.self_edit_id, exc)

    async def note_policy_trained(self, event: ev.PolicyAdapterTrained) -> None:
        # Its own scope's key, always: ``global`` is a scope name a tenant may take, and reading it as the
        # platform-wide fallback (``policy._global``) would hand that tenant's adapter to every scope.
        key = policy_key(event.scope)
        ref = PolicyAdapterRef(adapter_id=event.adapter_id, adapter=event.adapter, round=event.round)

        def change(current: PolicyAdapterRef | None) -> PolicyAdapterRef | None:
            if current is not None and (current.round > ref.round or current == ref):
                return None
            return ref

        await self.ports.state.compare_and_set(KV_REGISTRY, key, PolicyAdapterRef, change)

    async def _mark(self, scope: str, feedback_id: str, now: datetime) -> None:
        state = self.ports.state
        if await self.record(scope, feedback_id) is None:
            # The indexes go first: an open record is always found by the sweep, and every record
            # by a listing (the arrival index; ``now`` becomes the record's first_seen_at).
            await state.put(KV_REGISTRY, open_key(scope, feedback_id), Marker(at=now, feedback_id=feedback_id))
            await state.put(KV_REGISTRY, arrival_key(scope, now, feedback_id), Marker(at=now, feedback_id=feedback_id))
            await state.compare_and_set(KV_REGISTRY, seen_key(scope), Marker, lambda m: None if m else Marker(at=now))

    async def reopen_pinned(self, scope: str, feedback_id: str) -> FeedbackRecord | None:
        """A record held only because its scope was pinned goes back to be decided again."""
        return await self._update(
            scope, feedback_id,
            lambda cur: dc.reopen(cur) if cur is not None and cur.state == "awaiting_approval" and cur.hold == "pinned" else None,
        )

    async def _update(
        self, scope: str, feedback_id: str, change: Callable[[FeedbackRecord | None], FeedbackRecord | None]
    ) -> FeedbackRecord | None:
        return await self.ports.state.compare_and_set(
            KV_REGISTRY, feedback_key(scope, feedback_id), FeedbackRecord, change
        )

    # --------------------------------------------------------------- deciding

    async def settle(self, scope: str, feedback_id: str) -> FeedbackRecord | None:
        """Take every step that is due for this feedback; publish what was decided.

        Within one process a feedback is settled by one task at a time (the
        consumers and the sweep would otherwise publish the same outbox
        twice); across replicas compare-and-set and event ids keep it right.

        Outside the feedback's trace (the sweep, an operator's command over HTTP, or over NATS
        request-reply, whose message has a trace of its own) it works in the feedback's own trace,
        so what it publishes (a promotion, a rejection, a rebase and the training that follows)
        stays in the trace that explains the feedback."""
        key = (scope, feedback_id)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        token = None
        try:
            current = trace.get_current_span().get_span_context()
            known = await self.record(scope, feedback_id)
            recorded = known.trace_id.lower() if known and known.trace_id else None
            if not current.is_valid or (recorded and format(current.trace_id, "032x") != recorded):
                token = context.attach(feedback_context(feedback_id, recorded, scope))
            async with lock:
                return await self._settle(scope, feedback_id)
        finally:
            if token is not None:
                context.detach(token)
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _settle(self, scope: str, feedback_id: str) -> FeedbackRecord | None:
        record = await self.record(scope, feedback_id)
        for _ in range(MAX_STEPS):
            if record is None:
                return None
            if record.outbox and record.state != "promoting":
                record = await self._flush(record)
            if not await self._step(record):
                break
            record = await self.record(scope, feedback_id)
        if record is not None and record.outbox:
            record = await self._flush(record)
        if record is not None and not record.is_open:
            marker = open_key(scope, feedback_id)
            # Counted as it closes (before the open index goes: a crash is swept again), not by every
            # late event that settles it afterwards, long after the pool forgot it was counted.
            if await self.ports.state.read(KV_REGISTRY, marker, Marker) is not None:
                await self._count_for_policy(record)
                await self.ports.state.delete(KV_REGISTRY, marker)
        return record

    async def _step(self, record: FeedbackRecord) -> bool:
        if record.state == "promoting":
            await self._promote(record)
            return True
        if record.state == "awaiting_approval" and record.hold == "pinned":
            head = await self.head(record.scope)
            if head is None or not head.pinned:
                # Held only for a pin that is gone (an unpin that failed half-way, say): the
                # sweep decides it again, as the unpin would have.
                reopened = await self.reopen_pinned(record.scope, record.feedback_id)
                return reopened is not None and reopened.state != "awaiting_approval"
            return False
        if record.state not in ("collecting", "rebasing"):
            return False
        head, policy, now = await self.head(record.scope), await self.policy(record.scope), self.ports.clock()
        plan = dc.plan_decision(record, head, policy, now, self.config.max_rebase_attempts)
        if plan.action == "wait":
            return False
        if plan.action in ("promote", "hold") and await self._usable_manifest(record, plan.chosen) is None:
            return True
        intended = (plan.action, plan.chosen)
        rebase: tuple[ev.SelfEdit, tuple[ev.Probe, ...]] | None = None
        if plan.action == "rebase":
            rebase = await self._rebase_material(record, plan.chosen)
            if rebase is None and not self._done_waiting_for_selfedit(record, plan.chosen, now):
                return False  # its self-edit event is still on the way; the sweep looks again

        def change(current: FeedbackRecord | None) -> FeedbackRecord | None:
            if current is None:
                return None
            again = dc.plan_decision(current, head, policy, now, self.config.max_rebase_attempts)
            if (again.action, again.chosen) != intended:
                return None  # someone else moved it; the next step re-plans
            if again.action == "promote":
                return dc.to_promoting(current, again, now)
            if again.action == "hold":
                return dc.to_held(current, again, now)
            if again.action == "rebase":
                if rebase is not None:
                    return dc.to_rebasing(current, again, *rebase, head, now, policy.decision_timeout_s)
                again = unrebasable(again)
            return dc.to_rejected(current, again, now)

        await self._update(record.scope, record.feedback_id, change)
        return True

    def _done_waiting_for_selfedit(self, record: FeedbackRecord, index: int | None, now: datetime) -> bool:
        cand = record.candidate(index)  # type: ignore[arg-type]
        if cand is None or cand.reported_at is None:
            return True
        return (now - cand.reported_at).total_seconds() >= self.config.selfedit_wait_s

    async def _rebase_material(
        self, record: FeedbackRecord, index: int | None
    ) -> tuple[ev.SelfEdit, tuple[ev.Probe, ...]] | None:
        cand = record.candidate(index)  # type: ignore[arg-type]
        assert cand is not None
        kept = await self.self_edit(record.scope, record.feedback_id, cand.index)
        if kept is not None:
            return kept.self_edit, kept.probes
        if cand.adapter is not None:
            try:
                manifest = await self.ports.manifests.read(cand.adapter)
            except (IntegrityError, AdapterNotFound):
                return None
            if manifest.self_edit:
                try:
                    return ev.SelfEdit.model_validate(manifest.self_edit), record.probes_of(cand)
                except ValueError:
                    return None
        return None

    async def _usable_manifest(self, record: FeedbackRecord, index: int | None) -> AdapterManifest | None:
        return await promoting.usable_manifest(self, record, index)

    async def _promote(self, record: FeedbackRecord) -> None:
        await promoting.promote(self, record)

    async def rebuild_probes(self, scope: str) -> None:
        """probes.<scope> from the chain of versions the scope's active version stands on."""
        await promoting.rebuild_probes(self, scope)

    async def flush_head(self, scope: str) -> ScopeHead | None:
        """Publish what the scope head's outbox holds (an operator's rollback or pin; :mod:`.head_outbox`)."""
        return await head_outbox.flush(self, scope)

    async def _flush(self, record: FeedbackRecord) -> FeedbackRecord:
        sent = set()
        # The decision first (promoted, held, rebased), then the candidates it rejected, then the
        # feedback's end (feedback.decided): who waits for that one has seen the rest.
        order = {"adapter.rejected": 1, "feedback.decided": 2}
        for item in sorted(record.outbox, key=lambda i: order.get(i.get("type"), 0)):
            await self.ports.publish(ev.parse_event(item))
            sent.add(item["event_id"])
        updated = await self._update(record.scope, record.feedback_id, lambda current: without_published(current, sent))
        return updated or record

    # ------------------------------------------------------------- outer loop

    async def _count_for_policy(self, record: FeedbackRecord) -> None:
        """Pool a decided feedback's rewarded self-edits for the outer loop (:mod:`.outer_loop`)."""
        policy = await self.policy(record.scope)
        if policy.policy_round_examples > 0:
            await ol.count_decided(record, policy, self.ports.state, self.ports.publish, self.self_edit)

    # ------------------------------------------------------------------ sweep

    async def sweep(self) -> int:
        """Publish the head outboxes a crashed rollback or pin left (:mod:`.head_outbox`), then
        settle every open feedback (timeouts, interrupted steps); returns how many feedback were
        looked at."""
        await head_outbox.sweep(self, self.ports.clock())
        markers = await self.ports.state.entries(KV_REGISTRY, "open.*.*", Marker, skip_unreadable=True)
        for key, marker in markers.items():
            scope = key.split(".")[1]
            if marker.feedback_id is None:
                await self.ports.state.delete(KV_REGISTRY, key)
                continue
            try:
                await self.settle(scope, marker.feedback_id)
            except Exception:  # noqa: BLE001 - one bad record must not stop the sweep
                log.exception("sweep could not settle feedback %s", marker.feedback_id)
        return len(markers)
