"""Promotion, pure: moving the scope head, the version's tags, the accepted probes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared import events as ev
from shared.contracts import probe_chars
from shared.registry_view import AcceptedProbes
from shared.store import AdapterManifest

from .decision import active_version
from .records import CandidateRecord, FeedbackRecord, ScopeHead, VersionRecord

RECENT_PROMOTIONS = 64


@dataclass
class HeadMove:
    """What :func:`move_head` found: the version number, or why it cannot promote."""

    version: int | None = None
    stale: bool = False
    pinned: bool = False


def move_head(
    head: ScopeHead | None,
    record: FeedbackRecord,
    cand: CandidateRecord,
    now: datetime,
    approved_by: str | None,
    found: HeadMove,
) -> ScopeHead | None:
    """The head with ``cand`` as the next version, or None (see ``found``).

    Idempotent: a candidate promoted before is found in ``recent`` and keeps
    its number. A candidate whose parent is not the active version is
    ``stale``; a pinned scope holds every promotion (``pinned``).
    """
    found.version, found.stale, found.pinned = None, False, False
    assert cand.adapter_id is not None and cand.adapter is not None
    done = head.promoted_as(cand.adapter_id) if head else None
    if done is not None:
        found.version = done
        return None
    current = active_version(head)
    if cand.parent_version != current:
        found.stale = True
        return None
    if head is not None and head.pinned:
        # Approved ones too: an approval is refused on a pinned scope, so one that reaches a pinned
        # head raced the pin, and the pin (checked here, at the commit point) wins.
        found.pinned = True
        return None
    number = (head.latest_version if head else 0) + 1
    found.version = number
    recent = (*(head.recent if head else ()), (number, cand.adapter_id))
    return ScopeHead(
        scope=record.scope,
        version=number,
        adapter_id=cand.adapter_id,
        adapter=cand.adapter,
        pinned=head.pinned if head else False,
        pinned_by=head.pinned_by if head else None,
        pin_reason=head.pin_reason if head else None,
        feedback_id=record.feedback_id,
        previous_version=current,
        latest_version=number,
        recent=recent[-RECENT_PROMOTIONS:],
        last_request_id=head.last_request_id if head else None,
        recent_requests=head.recent_requests if head else (),
        updated_at=now,
        outbox=head.outbox if head else (),  # an operator's events not yet published: kept to go out
    )


def version_record(
    record: FeedbackRecord,
    cand: CandidateRecord,
    version: int,
    manifest: AdapterManifest | None,
    registry_trace_id: str | None,
    now: datetime,
) -> VersionRecord:
    """The version's record; ``manifest`` None where the adapter, active already, no longer reads
    back (its lineage's earlier feedback and its base model are then not recorded)."""
    assert cand.adapter_id is not None and cand.adapter is not None
    return VersionRecord(
        scope=record.scope,
        version=version,
        adapter_id=cand.adapter_id,
        adapter=cand.adapter,
        parent_version=cand.parent_version,
        parent_adapter_id=cand.parent_adapter_id,
        feedback_id=record.feedback_id,
        feedback_ids=tuple(dict.fromkeys((record.feedback_id, *(manifest.feedback_ids if manifest else ())))),
        candidate_index=cand.index,
        self_edit_id=cand.self_edit_id,
        reward=cand.reward,
        candidate_scores=cand.candidate_scores,
        parent_scores=cand.parent_scores,
        gates=cand.gates,
        evaluation_event_id=cand.evaluation_event_id,
        trace_id=cand.trace_id or (manifest.trace_id if manifest else None),
        registry_trace_id=registry_trace_id,
        base_model=manifest.base_model if manifest else None,
        base_model_sha256=manifest.base_model_sha256 if manifest else None,
        promoted_at=record.decided_at or now,
        approved_by=record.decided_by or "auto",
        probes=record.probes_of(cand),
    )


def chain_probes(chain: list[VersionRecord], scope: str, limit: int) -> AcceptedProbes:
    """The accepted probes of a version chain (newest first in ``chain``)."""
    pairs = tuple((v.feedback_id, p) for v in reversed(chain) for p in v.probes)
    return AcceptedProbes(scope=scope, probes=newest(pairs, limit))


# The accepted probes live in one KV value: bounded in characters as well as in number, so a
# scope's record stays well inside NATS's 1 MB message however long its probes are.
MAX_ACCEPTED_PROBE_CHARS = 400_000


def newest(pairs: tuple[tuple[str, ev.Probe], ...], limit: int) -> tuple[tuple[str, ev.Probe], ...]:
    """The newest ``limit`` (feedback id, probe) pairs that fit in MAX_ACCEPTED_PROBE_CHARS, oldest first."""
    kept: list[tuple[str, ev.Probe]] = []
    chars = 0
    for pair in reversed(pairs[-limit:]):
        chars += len(pair[0]) + probe_chars(pair[1])
        if chars > MAX_ACCEPTED_PROBE_CHARS:
            break
        kept.append(pair)
    return tuple(reversed(kept))
