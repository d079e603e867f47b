"""Trainer settings: the shared parts plus how this service consumes and trains.

Environment examples: ``SEAL_TRAINER__WORK_DIR=/scratch``,
``SEAL_TRAINER__ACK_WAIT_S=30``, ``SEAL_MODEL__DTYPE=bfloat16`` (bf16 weights
on CPU too; on a GPU "auto" already means bf16).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shared.settings import ServiceSettings
from shared.subjects import TRAINER_POLICY, TRAINER_REBASES, TRAINER_SELFEDITS, ConsumerSpec

# How hard rehearsal holds the model by default (the trainer's Anchoring reads these too).
REHEARSAL_WEIGHT = 3.0
REHEARSAL_BATCH = 16
# Earlier examples a continuing update replays per epoch by default (TrainerPorts reads it too).
REPLAY_PER_EPOCH = 16
# Sequences of the lineage a manifest keeps for replay, over all its updates (TrainerPorts reads it too).
LINEAGE_LIMIT = 4096


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt SEAL_* setting is an error

    # Scratch space: trained adapters before upload, verified parent adapters.
    work_dir: Path = Path(tempfile.gettempdir()) / "seal-trainer"
    # Verified parent adapters kept on local disk for the next update of a scope. At least 4: a
    # self-edit, a rebase and a policy request may each hold a parent while a fourth is fetched,
    # and a smaller cache removed a parent from under a training that was using it.
    parent_cache_size: int = Field(default=16, ge=4)
    # Consumer overrides (None: the shared ConsumerSpec's values). The message of a
    # training in progress is kept alive every ack_wait / 3 seconds.
    ack_wait_s: float | None = Field(default=None, gt=0)
    max_deliver: int | None = Field(default=None, ge=1)
    # Appended to every durable name: a separate pool of trainers with its own
    # consumers on the same stream (a canary, another GPU class).
    consumer_group: str = Field(default="", pattern=r"^[A-Za-z0-9_\-]*$")
    # Rehearsal (see rehearsal.py): how many of the base model's own answers a scope
    # update is held to (0: none; the default takes all 158 packaged prompts), a file of
    # prompts, one per line, instead of the packaged ones, the weight of the KL term that
    # holds them (0: none) and how many of them each optimizer step takes. Wider and
    # heavier than 64 / 1.0 / 4, it about halves the core questions lost at full strength for the
    # same learning (bench/RESULTS.md, "Learning against forgetting"), at about three times the
    # training time on a CPU.
    rehearsal_pairs: int = Field(default=256, ge=0, le=512)
    rehearsal_prompts: Path | None = None
    rehearsal_weight: float = Field(default=REHEARSAL_WEIGHT, ge=0.0, le=100.0)
    rehearsal_batch: int = Field(default=REHEARSAL_BATCH, ge=1, le=256)
    # A continuing update also trains, in every epoch, on this many of the sequences its lineage's
    # earlier updates were trained on (their question-answer pairs, where they have any), shared
    # evenly among them (0: none), each update's in a shuffled order that goes on from epoch to
    # epoch, so over 10 epochs 16 bring up each pair of 7 earlier updates about twice. 64 (about
    # every pair in every epoch) kept no more of the first passage in the forgetting bench, at
    # about 5x a late update's training time on a CPU (bench/RESULTS.md, "Forgetting").
    replay_per_epoch: int = Field(default=REPLAY_PER_EPOCH, ge=0, le=1024)
    # Every manifest records, for replay, what each update of its lineage was trained on (its
    # question-answer pairs where it has any): at most this many sequences in all, an even share
    # each, so a long-lived scope's manifests stay bounded (about 15 per update: the bound binds
    # after some 270 updates; examples.bounded_lineage).
    lineage_limit: int = Field(default=LINEAGE_LIMIT, ge=0, le=1_000_000)
    # Memory layout of a step (results do not depend on these).
    row_tokens: int = Field(default=4096, ge=16)
    pass_tokens: int = Field(default=8192, ge=16)
    # Tests only: sleep after every optimizer step, to make training long without using CPU.
    step_pause_s: float = Field(default=0.0, ge=0.0)

    def consumer(self, spec: ConsumerSpec) -> ConsumerSpec:
        """The shared spec with this deployment's overrides applied."""
        durable = f"{spec.durable}-{self.consumer_group}" if self.consumer_group else spec.durable
        return replace(
            spec,
            durable=durable,
            ack_wait=timedelta(seconds=self.ack_wait_s) if self.ack_wait_s else spec.ack_wait,
            max_deliver=self.max_deliver or spec.max_deliver,
        )

    @property
    def self_edits(self) -> ConsumerSpec:
        return self.consumer(TRAINER_SELFEDITS)

    @property
    def rebases(self) -> ConsumerSpec:
        return self.consumer(TRAINER_REBASES)

    @property
    def policy(self) -> ConsumerSpec:
        return self.consumer(TRAINER_POLICY)


class TrainerSettings(ServiceSettings):
    service_name: str = "trainer"
    trainer: TrainerConfig = TrainerConfig()
