"""Handlers: a validated event and the ports in, the events to publish out.

* :func:`train_self_edit` (``selfedit.generated`` and
  ``training.rebase_requested``): one LoRA update of the scope's active
  adapter (or a fresh LoRA) on the self-edit -> ``adapter.trained`` or
  ``adapter.training_failed``. Every manifest records, update by update, what
  replay uses of its whole lineage (within ``lineage_limit`` sequences in
  all); an update that continues an adapter
  replays some of every earlier update's in each epoch beside the new
  self-edit, so the scope keeps what it learned before.
* :func:`train_policy` (``policy.training_requested``): the generator's own
  policy adapter on (prompt, completion) pairs -> ``policy.trained``.

Idempotent on the self-edit: the parent is pinned on first delivery (see
:class:`ports.ParentLedger`), the adapter id is derived from (self-edit id,
parent adapter id, attempt), and an adapter already in the store is never
trained again: a redelivery after an upload whose ack was lost only
republishes the same event (same event id, so JetStream drops the copy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from services.trainer.examples import bounded_lineage, selected_sequences, split_question_answers, without_superseded
from services.trainer.lora_training import TrainedAdapter, TrainingJob, TrainingRejected
from services.trainer.ports import AdapterStorage, ParentCache, ParentLedger, RegistryReader
from services.trainer.settings import LINEAGE_LIMIT, REPLAY_PER_EPOCH
from services.trainer.uploads import store_once
from shared.dead_letters import PermanentFailure
from shared.events import (
    AdapterTrained,
    AdapterTrainingFailed,
    Event,
    ManifestRef,
    PolicyAdapterTrained,
    PolicyTrainingRequested,
    RebaseRequested,
    SelfEditGenerated,
    TrainingDirectives,
    derived_id,
)
from shared.models import other_base
from shared.registry_view import ActiveAdapter, PolicyAdapterRef
from shared.store import AdapterManifest, AdapterNotFound, IntegrityError, ManifestTooLarge
from shared.telemetry import current_trace_id

log = logging.getLogger(__name__)

LINEAGE = "lineage"  # manifest training key: [{"adapter_id", "feedback_id", "sequences"}, ...], oldest first
LINEAGE_SEQUENCES = "lineage_sequences"  # the flat list that earlier trainers recorded
RECIPE = "packed examples, loss on real tokens only, AdamW + linear decay, grad clip 1.0, KL to the base on rehearsal answers"


@dataclass
class TrainerPorts:
    trainer: Any  # LoraTrainer, or anything with train(job), base_model, base_model_sha256
    store: AdapterStorage
    registry: RegistryReader
    ledger: ParentLedger
    parents: ParentCache
    # Earlier sequences of the scope's lineage replayed per epoch of a continuing update (0: none).
    replay_per_epoch: int = REPLAY_PER_EPOCH
    # Sequences of the lineage a manifest keeps for replay, over all its updates.
    lineage_limit: int = LINEAGE_LIMIT
    # This process, in upload claims; how long it waits for another trainer's upload of the same adapter.
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    upload_wait_s: float = 120.0

    def trainer_stopping(self) -> bool:
        stopping = getattr(self.trainer, "stopping", None)
        return bool(stopping is not None and stopping.is_set())


class Parent(BaseModel):
    """The adapter an update starts from, as pinned in the ledger."""

    adapter_id: str
    adapter: ManifestRef
    version: int | None = None


# --------------------------------------------------------------------------- self-edits


async def train_self_edit(event: SelfEditGenerated | RebaseRequested, ports: TrainerPorts) -> list[Event]:
    self_edit = event.self_edit
    attempt = event.attempt if isinstance(event, RebaseRequested) else 0
    parent = await pinned_parent(
        ports, ("selfedit", self_edit.self_edit_id, attempt), lambda: ports.registry.active(event.scope)
    )
    adapter_id = derived_id("adapter", self_edit.self_edit_id, parent.adapter_id if parent else None, attempt)
    uri = ports.store.uri_for(event.scope, adapter_id)

    def trained(ref: ManifestRef, final_loss: float | None, seconds: float | None, trace_id: str | None) -> AdapterTrained:
        return event.caused(
            AdapterTrained,
            key=adapter_id,
            adapter_id=adapter_id,
            self_edit_id=self_edit.self_edit_id,
            candidate_index=self_edit.candidate_index,
            candidate_count=self_edit.candidate_count,
            parent_adapter_id=parent.adapter_id if parent else None,
            parent_version=parent.version if parent else None,
            parent_adapter=parent.adapter if parent else None,
            adapter=ref,
            probes=event.probes,
            final_loss=final_loss,
            seconds=seconds,
            trace_id=trace_id,
        )

    def failed(reason: str) -> AdapterTrainingFailed:
        log.warning("self-edit %s failed: %s", self_edit.self_edit_id, reason)
        return event.caused(
            AdapterTrainingFailed,
            key=adapter_id,
            self_edit_id=self_edit.self_edit_id,
            candidate_index=self_edit.candidate_index,
            candidate_count=self_edit.candidate_count,
            reason=reason,
        )

    if await asyncio.to_thread(ports.store.exists, uri):
        ref, manifest = await asyncio.to_thread(ports.store.stored, uri)
        log.info("adapter %s is already stored; republishing adapter.trained", adapter_id)
        return [trained(ref, manifest.metrics.get("final_loss"), manifest.metrics.get("seconds"), manifest.trace_id)]

    texts = selected_sequences(self_edit.sequences, self_edit.directives.use_sequences)
    if not texts:
        return [failed(f"the directives select no sequence (use_sequences={self_edit.directives.use_sequences})")]
    trace_id = current_trace_id()
    try:
        parent_dir, parent_manifest = await _parent_adapter(ports, parent)
        earlier = lineage(parent_manifest)
        # What this update asks again, an earlier one no longer teaches (a correction's old answer).
        current = without_superseded([*(g["sequences"] for g in earlier), list(texts)])[:-1]
        earlier = [{**g, "sequences": sequences} for g, sequences in zip(earlier, current)]
        plain, pairs = split_question_answers(texts)
        job = TrainingJob(
            adapter_id, self_edit.directives, texts=plain, pairs=pairs, parent_dir=parent_dir, rehearse=True,
            replay=tuple(tuple(group["sequences"]) for group in earlier), replay_per_epoch=ports.replay_per_epoch,
        )
        result = await asyncio.to_thread(ports.trainer.train, job)
    except TrainingRejected as exc:
        return [failed(exc.reason)]
    manifest = adapter_manifest(
        ports,
        adapter_id=adapter_id,
        scope=event.scope,
        kind="scope",
        feedback_id=event.feedback_id,
        directives=self_edit.directives,
        parent=parent,
        result=result,
        trace_id=trace_id,
        self_edit_id=self_edit.self_edit_id,
        self_edit=self_edit.model_dump(mode="json"),
        extra={
            "attempt": attempt,
            "cause_event_id": event.event_id,
            "replayed_per_epoch": result.replayed_per_epoch,
            LINEAGE: recorded_lineage(
                [*earlier, {"adapter_id": adapter_id, "feedback_id": event.feedback_id, "sequences": list(texts)}],
                ports.lineage_limit,
            ),
        },
    )
    try:
        ref, stored = await _stored(ports, uri, result, manifest)
    except TrainingRejected as exc:
        return [failed(exc.reason)]
    return [trained(ref, stored.metrics.get("final_loss"), stored.metrics.get("seconds"), stored.trace_id)]


# The characters a recorded lineage holds at most: its manifest must read back (MAX_MANIFEST_BYTES,
# 16 MiB, 4 bytes a character at worst). Counted in sequences alone, a scope whose updates were long
# texts outside ASCII outgrew it, and every later update of the scope failed.
MAX_LINEAGE_CHARS = 2_000_000


# Updates a recorded lineage names at most: past this the oldest of those that keep no sequences
# for replay drop out (about 100 bytes each; the registry's versions keep the whole chain), so a
# scope of a hundred thousand updates does not outgrow its manifests either.
MAX_LINEAGE_UPDATES = 20_000


def recorded_lineage(groups: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The lineage as a manifest records it: the ids of its latest MAX_LINEAGE_UPDATES updates
    (and of every update that keeps sequences), and what replay uses of their sequences, within
    ``limit`` sequences in all (:func:`examples.bounded_lineage`) and within MAX_LINEAGE_CHARS
    characters (a smaller sequence bound, as many times as needed)."""
    kept = bounded_lineage([g["sequences"] for g in groups], limit)
    while sum(len(s) for g in kept for s in g) > MAX_LINEAGE_CHARS and limit > 0:
        limit = min(limit, sum(len(g) for g in kept)) * 3 // 4
        kept = bounded_lineage([g["sequences"] for g in groups], limit)
    recorded = [{**g, "sequences": sequences} for g, sequences in zip(groups, kept)]
    extra = len(recorded) - MAX_LINEAGE_UPDATES
    if extra > 0:
        dropped = set()
        for i, group in enumerate(recorded):  # oldest first
            if len(dropped) == extra:
                break
            if not group["sequences"]:
                dropped.add(i)
        recorded = [g for i, g in enumerate(recorded) if i not in dropped]
    return recorded


def lineage(manifest: AdapterManifest | None) -> list[dict[str, Any]]:
    """What each update of the scope's lineage up to this adapter was trained on, oldest first:
    ``{"adapter_id", "feedback_id", "sequences"}`` per update (ids None where not recorded)."""
    if manifest is None:
        return []
    found = manifest.training.get(LINEAGE)
    if isinstance(found, list):
        return [
            {"adapter_id": g.get("adapter_id"), "feedback_id": g.get("feedback_id"),
             "sequences": [s for s in g.get("sequences") or () if isinstance(s, str)]}
            for g in found
            if isinstance(g, dict)
        ]
    # Stored before lineages were recorded per update: the whole lineage as one, or, older
    # still, the adapter's own self-edit as far as it says.
    flat = manifest.training.get(LINEAGE_SEQUENCES)
    if isinstance(flat, list):
        sequences = [s for s in flat if isinstance(s, str)]
    else:
        self_edit = manifest.self_edit or {}
        own = [s for s in self_edit.get("sequences") or () if isinstance(s, str)]
        use = (self_edit.get("directives") or {}).get("use_sequences")
        sequences = list(selected_sequences(own, use if isinstance(use, list) else None))
    return [{"adapter_id": manifest.adapter_id, "feedback_id": None, "sequences": sequences}] if sequences else []


# --------------------------------------------------------------------------- policy


async def train_policy(event: PolicyTrainingRequested, ports: TrainerPorts) -> list[Event]:
    """Train the generator's policy adapter (ReST-EM) on rewarded (prompt, completion) pairs.

    Continues the scope's current policy adapter (or the global one) when
    there is one. A request that cannot produce an adapter raises
    :class:`PermanentFailure` (dead-lettered with the reason): there is no
    policy-failure event in the contracts yet.
    """
    parent = await pinned_parent(ports, ("policy", event.event_id), lambda: ports.registry.policy(event.scope))
    adapter_id = derived_id("policy", event.event_id, parent.adapter_id if parent else None)
    uri = ports.store.uri_for(event.scope, adapter_id)

    def trained(ref: ManifestRef) -> PolicyAdapterTrained:
        return event.caused(PolicyAdapterTrained, key=adapter_id, adapter_id=adapter_id, adapter=ref, round=event.round)

    if await asyncio.to_thread(ports.store.exists, uri):
        ref, _ = await asyncio.to_thread(ports.store.stored, uri)
        return [trained(ref)]
    trace_id = current_trace_id()
    pairs = tuple((example.prompt, example.completion) for example in event.examples)
    try:
        parent_dir = await _parent_dir(ports, parent)
        job = TrainingJob(adapter_id, event.directives, pairs=pairs, parent_dir=parent_dir)
        result = await asyncio.to_thread(ports.trainer.train, job)
    except TrainingRejected as exc:
        raise PermanentFailure(f"policy adapter for round {event.round} not trained: {exc.reason}") from exc
    manifest = adapter_manifest(
        ports,
        adapter_id=adapter_id,
        scope=event.scope,
        kind="policy",
        feedback_id=event.feedback_id,
        directives=event.directives,
        parent=parent,
        result=result,
        trace_id=trace_id,
        extra={"round": event.round, "cause_event_id": event.event_id,
               "mean_reward": sum(e.reward for e in event.examples) / len(event.examples),
               # every feedback and self-edit the round learned from, not only the one that completed it
               "examples_from": [{"feedback_id": e.feedback_id, "self_edit_id": e.self_edit_id, "reward": e.reward}
                                 for e in event.examples]},
    )
    try:
        ref, _ = await _stored(ports, uri, result, manifest)
    except TrainingRejected as exc:
        raise PermanentFailure(f"policy adapter for round {event.round} not stored: {exc.reason}") from exc
    return [trained(ref)]


# --------------------------------------------------------------------------- shared steps


async def pinned_parent(ports: TrainerPorts, key_parts: tuple[object, ...], read: Any) -> Parent | None:
    """The parent pinned for this work item; on first sight, whatever ``read()`` returns now."""
    key = f"trainer.{key_parts[0]}.{derived_id(*key_parts)}"
    current: ActiveAdapter | PolicyAdapterRef | None = await read()
    proposal = None
    if current is not None:
        proposal = Parent(
            adapter_id=current.adapter_id, adapter=current.adapter, version=getattr(current, "version", None)
        ).model_dump(mode="json")
    stored = await ports.ledger.pin(key, json.dumps({"parent": proposal}).encode())
    pinned = json.loads(stored).get("parent")
    return Parent.model_validate(pinned) if pinned else None


async def _parent_dir(ports: TrainerPorts, parent: Parent | None) -> Path | None:
    return (await _parent_adapter(ports, parent))[0]


async def _parent_adapter(ports: TrainerPorts, parent: Parent | None) -> tuple[Path | None, AdapterManifest | None]:
    """The parent's verified local directory and manifest (None, None for a fresh adapter)."""
    if parent is None:
        return None, None
    try:
        directory, manifest = await asyncio.to_thread(ports.parents.fetch, parent.adapter)
    except (IntegrityError, AdapterNotFound) as exc:
        raise TrainingRejected(f"parent adapter {parent.adapter_id} cannot be used: {exc}") from exc
    trainer = ports.trainer
    if why := other_base(manifest.base_model, manifest.base_model_sha256, trainer.base_model, trainer.base_model_sha256):
        raise TrainingRejected(f"parent adapter {parent.adapter_id} was {why}")
    return directory, manifest


async def _stored(
    ports: TrainerPorts, uri: str, result: TrainedAdapter, manifest: AdapterManifest
) -> tuple[ManifestRef, AdapterManifest]:
    try:
        return await store_once(
            ports.store, ports.ledger, ports.owner, uri, result.directory, manifest,
            wait_s=ports.upload_wait_s, stopping=ports.trainer_stopping,
        )
    except ManifestTooLarge as exc:  # the same on every delivery: a failed training, said once
        raise TrainingRejected(str(exc)) from exc


def adapter_manifest(
    ports: TrainerPorts,
    *,
    adapter_id: str,
    scope: str,
    kind: str,
    feedback_id: str,
    directives: TrainingDirectives,
    parent: Parent | None,
    result: TrainedAdapter,
    trace_id: str | None,
    self_edit_id: str | None = None,
    self_edit: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> AdapterManifest:
    run = result.run
    return AdapterManifest(
        adapter_id=adapter_id,
        scope=scope,
        kind=kind,
        base_model=ports.trainer.base_model,
        base_model_sha256=ports.trainer.base_model_sha256,
        parent_adapter_id=parent.adapter_id if parent else None,
        feedback_ids=(feedback_id,),
        self_edit_id=self_edit_id,
        self_edit=self_edit,
        directives=directives.model_dump(mode="json"),
        training={
            "recipe": RECIPE,
            "lora": result.lora,
            "learning_rate": directives.learning_rate,
            "epochs": directives.epochs,
            "batch_size": directives.batch_size,
            "max_seq_len": directives.max_seq_len,
            "seed": directives.seed,
            "examples": result.examples,
            "truncated_examples": result.truncated,
            "rehearsal_examples": result.rehearsal_examples,
            "adapter_scale": result.adapter_scale,
            "reused_training_of": result.reused_from,
            "device": result.device,
            "dtype": result.dtype,
            "parent_version": parent.version if parent else None,
            "parent_adapter": parent.adapter.model_dump(mode="json") if parent else None,
            "versions": result.versions,
            "trained_at_unix": time.time(),
            **(extra or {}),
        },
        metrics={
            "loss_curve": run.loss_curve,
            "epoch_losses": run.epoch_losses,
            "rehearsal_kl_curve": run.anchor_curve,
            "rehearsal_kl": result.rehearsal_kl,
            "initial_loss": run.initial_loss,
            "final_loss": run.final_loss,
            "steps": run.steps,
            "target_tokens": run.target_tokens,
            "processed_tokens": run.processed_tokens,
            "seconds": run.seconds,
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_memory_kind": result.peak_memory_kind,
        },
        trace_id=trace_id,
    )
