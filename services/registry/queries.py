"""What the registry answers: scopes, versions, lineage both ways.

Results are plain JSON-ready dicts, the same over HTTP and NATS request-reply.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from shared.registry_view import ScopePolicy, UnreadableRecord
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS

from .ledger import Ledger
from .ports import NotFound
from .records import (
    FEEDBACK_LIST_LIMIT,
    OPEN_STATES,
    FeedbackRecord,
    Marker,
    ScopeHead,
    VersionRecord,
    arrival_key,
    arrival_stamp,
    indexed_key,
)

log = logging.getLogger(__name__)

# Arrival keys a scope's first listing writes at once for records made before the index.
INDEX_WRITES_AT_ONCE = 64

MANIFEST_FIELDS = (
    "base_model", "base_model_sha256", "parent_adapter_id", "feedback_ids", "directives",
    "training", "metrics", "trace_id", "created_at", "files",
)


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")


def head_summary(head: ScopeHead | None) -> dict[str, Any]:
    if head is None:
        return {"active_version": None, "previous_version": None, "latest_version": 0, "pinned": False}
    return {
        "active_version": head.version,
        "active_adapter_id": head.adapter_id,
        "previous_version": head.previous_version,
        "latest_version": head.latest_version,
        "pinned": head.pinned,
        "pinned_by": head.pinned_by,
        "pin_reason": head.pin_reason,
        "updated_at": head.updated_at.isoformat() if head.updated_at else None,
    }


async def list_scopes(ledger: Ledger) -> list[dict[str, Any]]:
    state = ledger.ports.state
    heads = {k.split(".", 1)[1]: h for k, h in (await state.entries(KV_REGISTRY, "active.*", ScopeHead, skip_unreadable=True)).items()}
    seen = {k.split(".", 1)[1] for k in await state.entries(KV_REGISTRY, "seen.*", Marker, skip_unreadable=True)}
    policies = await state.entries(KV_SCOPE_SETTINGS, "*", ScopePolicy, skip_unreadable=True)
    open_counts: dict[str, int] = {}
    for key in await state.entries(KV_REGISTRY, "open.*.*", Marker, skip_unreadable=True):
        scope = key.split(".")[1]
        open_counts[scope] = open_counts.get(scope, 0) + 1
    scopes = sorted(set(heads) | seen | set(policies))
    return [
        {
            "scope": scope,
            **head_summary(heads.get(scope)),
            "approval": (policies.get(scope) or ScopePolicy()).approval,
            "open_feedback": open_counts.get(scope, 0),
        }
        for scope in scopes
    ]


async def list_versions(ledger: Ledger, scope: str) -> list[dict[str, Any]]:
    head = await ledger.head(scope)
    versions = await ledger.ports.state.entries(KV_REGISTRY, f"version.{scope}.*", VersionRecord, skip_unreadable=True)
    rows = []
    for record in sorted(versions.values(), key=lambda v: v.version):
        aliases = []
        if head is not None and record.version == head.version:
            aliases.append("active")
        if head is not None and record.version == head.previous_version:
            aliases.append("previous")
        rows.append({**_dump(record), "aliases": aliases})
    return rows


async def version_lineage(ledger: Ledger, scope: str, version: int) -> dict[str, Any]:
    """Version -> evaluation -> training run -> self-edit -> feedback, with trace ids."""
    record = await ledger.version(scope, version)
    head = await ledger.head(scope)
    feedback = await ledger.record(scope, record.feedback_id)
    cand = feedback.candidate(record.candidate_index) if feedback else None
    kept = await ledger.self_edit(scope, record.feedback_id, record.candidate_index)
    manifest: dict[str, Any] | None = None
    manifest_error = None
    stored_self_edit: dict[str, Any] | None = None
    try:
        found = await ledger.ports.manifests.read(record.adapter)
        stored_self_edit = found.self_edit
        manifest = {k: v for k, v in found.model_dump(mode="json").items() if k in MANIFEST_FIELDS}
    except Exception as exc:  # noqa: BLE001 - lineage still answers without the store
        manifest_error = f"{type(exc).__name__}: {exc}"
    chain = []
    number = record.parent_version
    while number is not None and len(chain) < 1000:
        try:
            parent = await ledger.version(scope, number)
        except NotFound:
            break
        chain.append({"version": parent.version, "adapter_id": parent.adapter_id, "feedback_id": parent.feedback_id})
        number = parent.parent_version
    aliases = [
        name
        for name, number in (("active", head.version if head else None), ("previous", head.previous_version if head else None))
        if number == version
    ]
    return {
        "version": {**_dump(record), "aliases": aliases},
        "evaluation": None
        if cand is None
        else {
            "event_id": cand.evaluation_event_id,
            "trace_id": cand.trace_id,
            "reward": cand.reward,
            "passed": cand.passed,
            "candidate_scores": _dump(cand.candidate_scores) if cand.candidate_scores else None,
            "parent_scores": _dump(cand.parent_scores) if cand.parent_scores else None,
            "gates": [_dump(g) for g in cand.gates],
            "attempt": cand.attempt,
            "earlier_attempts": [_dump(a) for a in cand.earlier_attempts],
        },
        "training": {
            "run": _dump(cand.training) if cand is not None and cand.training else None,
            "manifest": manifest,
            "manifest_error": manifest_error,
        },
        "self_edit": {"event_id": None, "source": "manifest", **stored_self_edit}
        if kept is None and stored_self_edit
        else None
        if kept is None
        else {
            "event_id": kept.event_id,
            "source": "selfedit.generated",
            "generator_adapter": kept.generator_adapter,
            **_dump(kept.self_edit),
            "probes": [_dump(p) for p in kept.probes],
        },
        "feedback": None if feedback is None else feedback_summary(feedback),
        "ancestors": chain,
    }


def feedback_summary(record: FeedbackRecord) -> dict[str, Any]:
    return {
        "feedback_id": record.feedback_id,
        "scope": record.scope,
        "state": record.state,
        "kind": record.kind,
        "summary": record.summary,
        "submitted_by": record.submitted_by,
        "submitted_at": record.submitted_at.isoformat() if record.submitted_at else None,
        "event_id": record.feedback_event_id,
        "trace_id": record.trace_id,
        "version": record.version,
        "chosen": record.chosen,
        "hold": record.hold,
        "reasons": list(record.reasons),
        "decided_by": record.decided_by,
        "decided_at": record.decided_at.isoformat() if record.decided_at else None,
        "deadline_at": record.deadline_at.isoformat() if record.deadline_at else None,
    }


async def feedback_fate(ledger: Ledger, feedback_id: str) -> dict[str, Any]:
    """From a feedback id, what became of it: every candidate, its verdict and why."""
    record = await ledger.find_record(feedback_id)
    candidates = []
    for cand in record.candidates:
        kept = await ledger.self_edit(record.scope, feedback_id, cand.index)
        candidates.append(
            {
                **_dump(cand),
                "self_edit_format": kept.self_edit.format if kept else None,
                "self_edit_event_id": kept.event_id if kept else None,
            }
        )
    return {
        **feedback_summary(record),
        "candidate_count": record.candidate_count,
        "candidates": candidates,
        "feedback_probes": [_dump(p) for p in record.feedback_probes],
        "pending_events": len(record.outbox),
    }


async def list_feedback(
    ledger: Ledger, scope: str, state: str | None = None, limit: int = FEEDBACK_LIST_LIMIT
) -> list[dict[str, Any]]:
    """The scope's latest ``limit`` feedback (in ``state``), oldest first: latest by when the
    registry first heard of each (``first_seen_at``), not by the producer's clock.

    Undecided states are found through the open index (``open.<scope>.*``), so "what is
    waiting for an operator" reads only the undecided records, not the scope's history. The
    others walk the arrival index (``arrived.<scope>.*``) from its newest key and read records
    until ``limit`` match, so a long-lived scope's listing does not read its whole history."""
    if state in OPEN_STATES:
        markers = await ledger.ports.state.entries(KV_REGISTRY, f"open.{scope}.*", Marker, skip_unreadable=True)
        found = await asyncio.gather(*(_readable(ledger, scope, m.feedback_id) for m in markers.values() if m.feedback_id))
        records = [r for r in found if r is not None and r.state == state]
    else:
        records = await _latest(ledger, scope, state, limit)
    records.sort(key=_arrival_order)
    return [feedback_summary(r) for r in records[max(0, len(records) - limit):]]


def _arrival_order(record: FeedbackRecord) -> tuple[datetime, datetime, str]:
    return (record.first_seen_at, record.submitted_at or record.first_seen_at, record.feedback_id)


async def _latest(ledger: Ledger, scope: str, state: str | None, limit: int) -> list[FeedbackRecord]:
    """At least the newest ``limit`` records in ``state`` (any state: None), with every record that
    arrived together with the oldest of them (one arrival stamp), so the caller's order decides."""
    store = ledger.ports.state
    if await store.read(KV_REGISTRY, indexed_key(scope), Marker) is None:
        await _index_scope(ledger, scope)
    arrivals = await store.entries(KV_REGISTRY, f"arrived.{scope}.*.*", Marker, skip_unreadable=True)
    newest_first: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key in sorted(arrivals, reverse=True):
        feedback_id = arrivals[key].feedback_id
        if feedback_id and feedback_id not in seen:  # two arrival keys if two events raced in first
            seen.add(feedback_id)
            newest_first.append((arrival_stamp(key), feedback_id))
    records: list[FeedbackRecord] = []
    last_stamp: str | None = None
    start, size = 0, max(limit, 1)
    while start < len(newest_first):
        if len(records) >= limit and newest_first[start][0] != last_stamp:
            break
        # ``limit`` records first; a state that is rare in the scope's recent history reads twice
        # as many each round after, so finding it takes a few round trips, not one per record.
        batch = newest_first[start:start + size]
        start, size = start + len(batch), size * 2
        found = await asyncio.gather(*(_readable(ledger, scope, feedback_id) for _, feedback_id in batch))
        for (stamp, _), record in zip(batch, found):
            if record is not None and (state is None or record.state == state):
                records.append(record)
                last_stamp = stamp
    return records


async def _index_scope(ledger: Ledger, scope: str) -> None:
    """Give every feedback record of ``scope`` its arrival key, once: records written before the
    index existed have none. One read of the scope's records, then never again."""
    store = ledger.ports.state
    stored = await store.entries(KV_REGISTRY, f"feedback.{scope}.*", FeedbackRecord, skip_unreadable=True)
    records = list(stored.values())
    for start in range(0, len(records), INDEX_WRITES_AT_ONCE):
        await asyncio.gather(*(
            store.put(KV_REGISTRY, arrival_key(scope, r.first_seen_at, r.feedback_id), Marker(at=r.first_seen_at, feedback_id=r.feedback_id))
            for r in records[start:start + INDEX_WRITES_AT_ONCE]
        ))
    await store.put(KV_REGISTRY, indexed_key(scope), Marker(at=ledger.ports.clock()))
    if stored:
        log.info("arrival index of scope %s: %d records written before it added", scope, len(stored))


async def _readable(ledger: Ledger, scope: str, feedback_id: str) -> FeedbackRecord | None:
    """A feedback record for a listing: one that does not parse is left out (logged), not fatal."""
    try:
        return await ledger.record(scope, feedback_id)
    except UnreadableRecord as exc:
        log.warning("feedback %s of %s left out of a listing: %s", feedback_id, scope, exc)
        return None

