"""What the registry answers: scopes, versions, lineage both ways.

Results are plain JSON-ready dicts, the same over HTTP and NATS request-reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

from shared.registry_view import ScopePolicy, UnreadableRecord
from shared.store import AdapterNotFound, IntegrityError
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS

from .ledger import Ledger
from .ports import NotFound
from .records import (
    FEEDBACK_LIST_LIMIT,
    OPEN_STATES,
    SCOPE_LIST_LIMIT,
    VERSION_LIST_LIMIT,
    FeedbackRecord,
    Marker,
    ScopeHead,
    VersionRecord,
    arrival_key,
    arrival_stamp,
    key_token,
    token_id,
    version_key,
)

log = logging.getLogger(__name__)

R = TypeVar("R")

# A listing reads records (and writes missing arrival keys) at most this many at once, and
# after this many point reads beyond its limit, reads the rest of the scope in one pass.
LISTING_BATCH = 256
LISTING_POINT_READS = 1024

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


async def list_scopes(ledger: Ledger, after: str | None = None, limit: int = SCOPE_LIST_LIMIT) -> list[dict[str, Any]]:
    """Up to ``limit`` scopes in name order, those named after ``after`` (the last of the previous page)."""
    state = ledger.ports.state
    heads = {k.split(".", 1)[1]: h for k, h in (await state.entries(KV_REGISTRY, "active.*", ScopeHead, skip_unreadable=True)).items()}
    seen = {k.split(".", 1)[1] for k in await state.entries(KV_REGISTRY, "seen.*", Marker, skip_unreadable=True)}
    policies = await state.entries(KV_SCOPE_SETTINGS, "*", ScopePolicy, skip_unreadable=True)
    open_counts: dict[str, int] = {}
    for key in await state.entries(KV_REGISTRY, "open.*.*", Marker, skip_unreadable=True):
        scope = key.split(".")[1]
        open_counts[scope] = open_counts.get(scope, 0) + 1
    scopes = [s for s in sorted(set(heads) | seen | set(policies)) if after is None or s > after][:limit]
    return [
        {
            "scope": scope,
            **head_summary(heads.get(scope)),
            "approval": (policies.get(scope) or ScopePolicy()).approval,
            "open_feedback": open_counts.get(scope, 0),
        }
        for scope in scopes
    ]


async def list_versions(ledger: Ledger, scope: str, limit: int = VERSION_LIST_LIMIT) -> list[dict[str, Any]]:
    """The scope's latest ``limit`` versions, oldest first (their numbers from the keys alone)."""
    head = await ledger.head(scope)
    numbers = sorted(int(key.rsplit(".", 1)[1]) for key in await ledger.ports.state.keys(KV_REGISTRY, f"version.{scope}.*")
                     if key.rsplit(".", 1)[1].isdigit())
    found = await asyncio.gather(*(_version(ledger, scope, n) for n in numbers[max(0, len(numbers) - limit):]))
    rows = []
    for record in (v for v in found if v is not None):
        aliases = []
        if head is not None and record.version == head.version:
            aliases.append("active")
        if head is not None and record.version == head.previous_version:
            aliases.append("previous")
        rows.append({**_dump(record), "aliases": aliases})
    return rows


async def _version(ledger: Ledger, scope: str, number: int) -> VersionRecord | None:
    """A version record for a listing (None: gone, or left out, see :func:`_listed`)."""
    return await _listed(ledger.ports.state.read(KV_REGISTRY, version_key(scope, number), VersionRecord),
                         f"version {number} of {scope}")


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
    except (IntegrityError, AdapterNotFound) as exc:
        manifest_error = str(exc)
    except Exception:  # noqa: BLE001 - lineage still answers without the store
        # The details stay in the log: the store's errors name its host, bucket and keys.
        log.warning("lineage of %s v%s: the adapter's manifest could not be read", scope, record.version, exc_info=True)
        manifest_error = "the object store did not answer (the registry's log has the details)"
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


async def feedback_fate(ledger: Ledger, feedback_id: str, scope: str | None = None) -> dict[str, Any]:
    """From a feedback id (in ``scope``, where given), what became of it: every candidate, its verdict and why."""
    record = await ledger.find_record(feedback_id, scope)
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
    if limit < 1:
        return []
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
    """At least the newest ``limit`` records in ``state`` (any state: None), and every record that
    may tie with the oldest of them, so that the caller's order decides.

    Two key listings (no values): the arrival index and the scope's records. A record with no
    arrival key (written by a registry before the index, or by one during a rolling upgrade) gets
    one here; an arrival key with no record is passed over. Then records are read newest first:
    ``limit`` of them, then batches twice as large (each at most ``LISTING_BATCH``) while too few
    match, and past ``limit + LISTING_POINT_READS`` the rest in one pass over the scope's records."""
    store = ledger.ports.state
    stored = {key.split(".", 2)[2] for key in await store.keys(KV_REGISTRY, f"feedback.{scope}.*")}
    newest: dict[str, str] = {}  # record token -> its newest arrival stamp
    for key in await store.keys(KV_REGISTRY, f"arrived.{scope}.*.*"):
        _, _, stamp, token = key.split(".", 3)
        if token in stored and stamp > newest.get(token, ""):
            newest[token] = stamp  # two keys when two first events raced: the record is no newer than this
    known: dict[str, FeedbackRecord] = {}
    if missing := stored - newest.keys():
        for record in await _index(ledger, scope, missing):
            token = key_token(record.feedback_id)
            newest[token], known[token] = arrival_stamp(record.first_seen_at), record
    walk = sorted(((stamp, token) for token, stamp in newest.items()), reverse=True)

    async def read(token: str) -> FeedbackRecord | None:
        return known[token] if token in known else await _readable(ledger, scope, token_id(token))

    def wanted(record: FeedbackRecord | None) -> bool:
        return record is not None and (state is None or record.state == state)

    records: list[FeedbackRecord] = []
    start, size, reads = 0, min(limit, LISTING_BATCH), 0
    while start < len(walk):
        if len(records) >= limit:
            # Every record not read yet arrived no later than its key says: once that is before
            # the limit-th newest found, none of them can be among the newest.
            boundary = sorted(records, key=_arrival_order)[-limit]
            if walk[start][0] < arrival_stamp(boundary.first_seen_at):
                break
        if reads >= limit + LISTING_POINT_READS:
            records += await _scope_records(ledger, scope, {token for _, token in walk[start:]}, state)
            break
        batch = walk[start:start + size]
        start, size, reads = start + len(batch), min(size * 2, LISTING_BATCH), reads + len(batch)
        found = await asyncio.gather(*(read(token) for _, token in batch))
        records += [r for r in found if wanted(r)]
    return records


async def _index(ledger: Ledger, scope: str, tokens: set[str]) -> list[FeedbackRecord]:
    """Read the records ``tokens`` name and give each its arrival key. A few are read one by one;
    many (a scope from before the index, on its first listing) in one pass over the scope."""
    store = ledger.ports.state
    if len(tokens) <= LISTING_BATCH:
        found = await asyncio.gather(*(_readable(ledger, scope, token_id(token)) for token in tokens))
        records = [r for r in found if r is not None]
    else:
        records = await _scope_records(ledger, scope, tokens)
    for start in range(0, len(records), LISTING_BATCH):
        await asyncio.gather(*(
            store.put(KV_REGISTRY, arrival_key(scope, r.first_seen_at, r.feedback_id), Marker(at=r.first_seen_at, feedback_id=r.feedback_id))
            for r in records[start:start + LISTING_BATCH]
        ))
    if records:
        log.info("arrival index of scope %s: added %d records that had no key", scope, len(records))
    return records


async def _readable(ledger: Ledger, scope: str, feedback_id: str) -> FeedbackRecord | None:
    """A feedback record for a listing (None: gone, or left out, see :func:`_listed`)."""
    return await _listed(ledger.record(scope, feedback_id), f"feedback {feedback_id} of {scope}")


async def _listed(reading: Awaitable[R], what: str) -> R | None:
    """A record for a listing: one that does not parse is left out (logged), not fatal."""
    try:
        return await reading
    except UnreadableRecord as exc:
        log.warning("%s left out of a listing: %s", what, exc)
        return None


async def _scope_records(ledger: Ledger, scope: str, tokens: set[str], state: str | None = None) -> list[FeedbackRecord]:
    """The scope's records named by ``tokens`` (in ``state``, if given), in one pass over the scope."""
    everything = await ledger.ports.state.entries(KV_REGISTRY, f"feedback.{scope}.*", FeedbackRecord, skip_unreadable=True)
    return [r for key, r in everything.items() if key.split(".", 2)[2] in tokens and (state is None or r.state == state)]

