"""Promotion, the step that touches the store and the scope head: a ``promoting`` record's chosen
adapter, checked intact in the store, becomes the scope's next version (the head is the commit
point), its version record and the scope's regression set are written, and the record becomes
``promoted``; or, where the head moved, got pinned or the adapter went missing, the record goes
back to be decided again. The pure parts are in :mod:`.promotion`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from shared.registry_view import AcceptedProbes, probes_key
from shared.store import AdapterManifest, AdapterNotFound, IntegrityError
from shared.subjects import KV_REGISTRY

from . import decision as dc
from . import promotion as pr
from .records import CandidateRecord, FeedbackRecord, ScopeHead, VersionRecord, head_key, version_key

if TYPE_CHECKING:
    from .ledger import Ledger

log = logging.getLogger(__name__)


async def usable_manifest(ledger: Ledger, record: FeedbackRecord, index: int | None) -> AdapterManifest | None:
    """The chosen adapter's manifest, read back intact; None, with the candidate marked
    unusable, if it does not read back (unmarked where the scope's head holds it already: another
    replica promoted it after its own read, and that promotion stands)."""
    cand = record.candidate(index)  # type: ignore[arg-type]
    assert cand is not None and cand.adapter is not None
    try:
        return await ledger.ports.manifests.usable(cand.adapter)
    except (IntegrityError, AdapterNotFound) as exc:
        reason = f"adapter {cand.adapter_id} cannot be used: {exc}"
        log.warning(reason)
        if await promoted_already(ledger, record.scope, cand.adapter_id):
            return None

        def change(current: FeedbackRecord | None) -> FeedbackRecord | None:
            now_cand = current.candidate(cand.index) if current else None
            if current is None or now_cand is None or now_cand.adapter_id != cand.adapter_id or now_cand.decided:
                return None
            return current.with_candidate(now_cand.model_copy(update={"result": "unusable", "passed": False, "reasons": (reason,)}))

        await ledger._update(record.scope, record.feedback_id, change)
        return None


async def promoted_already(ledger: Ledger, scope: str, adapter_id: str | None) -> int | None:
    """The version the scope's head made of ``adapter_id``, if it did (the head is the commit point)."""
    head = await ledger.head(scope)
    return head.promoted_as(adapter_id) if head is not None and adapter_id is not None else None


async def committed_manifest(ledger: Ledger, record: FeedbackRecord, cand: CandidateRecord) -> AdapterManifest | None:
    """The manifest of a candidate the head holds already, for its version record; None, said
    loudly, where it no longer reads back: the version is active all the same (the head is the
    commit point), and its promotion is finished rather than retried for ever."""
    assert cand.adapter is not None
    try:
        return await ledger.ports.manifests.read(cand.adapter)
    except (IntegrityError, AdapterNotFound) as exc:
        log.error("scope %s: the active adapter %s (feedback %s) no longer reads back: %s; its version record "
                  "is written without its manifest's details. Roll the scope back (seal rollback).",
                  record.scope, cand.adapter_id, record.feedback_id, exc)
        return None


async def promote(ledger: Ledger, record: FeedbackRecord) -> None:
    """Steps 3 and 4 of :mod:`.ledger` for a ``promoting`` record; safe to run again."""
    cand = record.candidate(record.chosen)  # type: ignore[arg-type]
    assert cand is not None and cand.adapter is not None and cand.adapter_id is not None
    now, by = ledger.ports.clock(), record.decided_by
    head_now = await ledger.head(record.scope)
    manifest: AdapterManifest | None
    if head_now and head_now.promoted_as(cand.adapter_id):
        manifest = await committed_manifest(ledger, record, cand)  # a re-run: the head moved already
    elif (manifest := await usable_manifest(ledger, record, record.chosen)) is None:
        # Read before the head moves (the head is the commit point): an adapter that went
        # missing or corrupt since the decision (one held for an operator's approval, say)
        # must not become the active version. The record goes back to be decided again, unless
        # another replica's promotion of it committed meanwhile: that one finishes it (or the sweep).
        if not await promoted_already(ledger, record.scope, cand.adapter_id):
            await back_off(ledger, record, head_now, now, pinned=False)
        return
    found = pr.HeadMove()
    head = await ledger.ports.state.compare_and_set(
        KV_REGISTRY, head_key(record.scope), ScopeHead, lambda h: pr.move_head(h, record, cand, now, by, found)
    )
    if found.stale or found.pinned:
        await back_off(ledger, record, head, now, pinned=found.pinned)
        return
    version = found.version
    assert version is not None
    tags = pr.version_record(record, cand, version, manifest, ledger.ports.trace_id(), now)
    if manifest is not None:
        await ledger.ports.state.put(KV_REGISTRY, version_key(record.scope, version), tags)
    else:  # never over the record of the replica that did read the manifest
        await ledger.ports.state.compare_and_set(
            KV_REGISTRY, version_key(record.scope, version), VersionRecord, lambda cur: tags if cur is None else None
        )
    head_after = await ledger.head(record.scope)
    if head_after is not None and head_after.outbox:  # a rollback's or pin's events whose publish failed
        await ledger.flush_head(record.scope)
    # The regression set from the chain of the head as it is now, this version's record written:
    # a rebuild by a rollback (or another promotion) that ran while this version's record was
    # missing wrote nothing, or a set without these probes, and this one puts it right.
    await rebuild_probes(ledger, record.scope)

    def promoted(cur: FeedbackRecord | None) -> FeedbackRecord | None:
        if cur is None or cur.state in ("promoted", "rejected"):
            return None
        if cur.state != "promoting":
            # Another replica, which read the head before this one moved it, found the adapter
            # unreadable and sent the record back to be decided again: the head is the commit
            # point, and the version stands.
            now_cand = cur.candidate(cand.index)
            if now_cand is None or now_cand.adapter_id != cand.adapter_id:
                return None
            cur = cur.with_candidate(cand).model_copy(update={"chosen": cand.index, "decided_by": by, "hold": None})
        return dc.to_promoted(cur, version, cand.parent_version, now, by)

    await ledger._update(record.scope, record.feedback_id, promoted)


async def back_off(ledger: Ledger, record: FeedbackRecord, head: ScopeHead | None, now: datetime, pinned: bool) -> None:
    """The head moved (or got pinned), or the chosen adapter became unusable, between the
    decision and the promotion.

    Pinned: the candidate is held. Otherwise the record goes back to ``collecting``, where
    the next step plans its rebase, another candidate, or gives up."""

    def change(current: FeedbackRecord | None) -> FeedbackRecord | None:
        if current is None or current.state != "promoting":
            return None
        if pinned:
            reason = f"scope is pinned at v{head.version}" if head else "scope is pinned"
            plan = dc.Plan("hold", current.chosen, reasons=(reason,), hold="pinned")
            return dc.to_held(current.model_copy(update={"state": "collecting"}), plan, now)
        return current.model_copy(update={"state": "collecting", "chosen": None, "decided_by": None, "decided_at": None})

    await ledger._update(record.scope, record.feedback_id, change)


# A rebuild starts again from the head while the head moved under it (a promotion or a rollback
# meanwhile); past this many tries it leaves the set to the writer that moved it last.
REBUILD_ATTEMPTS = 5


async def rebuild_probes(ledger: Ledger, scope: str) -> None:
    """probes.<scope> from the chain of versions the scope's active version stands on.

    From the head as it is read here, not as the caller last saw it, and again while the head
    moved during the rebuild: a promotion that landed meanwhile (after a rollback, a version
    trained on the version rolled back to) has added its probes to the set already, and a rebuild
    from the older head written after that took them out, leaving that feedback unguarded. A
    promotion that moves the head after the rebuild's write adds its probes after it."""
    for _ in range(REBUILD_ATTEMPTS):
        head = await ledger.head(scope)
        if head is None:
            return
        rebuilt = await _chain_probes(ledger, scope, head.version)
        if rebuilt is None:
            return
        await ledger.ports.state.compare_and_set(
            KV_REGISTRY, probes_key(scope), AcceptedProbes, lambda cur: None if cur == rebuilt else rebuilt
        )
        after = await ledger.head(scope)
        if after is None or after.version == head.version:
            return
    log.warning("probes of %s: the head kept moving during %d rebuilds; the last promotion's set stands",
                scope, REBUILD_ATTEMPTS)


async def _chain_probes(ledger: Ledger, scope: str, version: int) -> AcceptedProbes | None:
    """The accepted probes of ``version``'s chain, newest kept; None where the chain cannot be read
    whole (nothing is written then: a set missing older feedback leaves it unguarded)."""
    limit = ledger.config.max_accepted_probes
    chain: list[VersionRecord] = []
    number: int | None = version
    held = 0
    while number is not None and held < limit:  # older versions than these add nothing that is kept
        found = await ledger.ports.state.read(KV_REGISTRY, version_key(scope, number), VersionRecord)
        if found is None:
            # The head's own record is not written yet (its promotion moves the head first, then
            # writes it, then adds its probes), or an older one's promotion stopped between the
            # two and is carried on by the sweep, which rebuilds then.
            log.info("probes of %s not rebuilt: v%d has no version record yet", scope, number)
            return None
        chain.append(found)
        held += len(found.probes)
        number = found.parent_version
    return pr.chain_probes(chain, scope, limit)
