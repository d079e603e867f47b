"""Generator settings: the shared service parts plus the generator's own knobs.

Environment: ``SEAL_GENERATOR__MAX_NEW_TOKENS=384``,
``SEAL_GENERATOR__TEMPERATURE=0.8`` and so on.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.generator.asking import AskFirst
from shared.settings import ServiceSettings


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt SEAL_* setting is an error

    # Sampling (SEAL samples self-edits at temperature 1.0).
    max_new_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=1.0, gt=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_prompt_tokens: int = Field(default=1536, ge=64)
    # Validation bounds for one candidate.
    max_sequences: int = Field(default=64, ge=1, le=256)
    max_sequence_chars: int = Field(default=1500, ge=64, le=4000)
    min_sequence_chars: int = Field(default=12, ge=1)
    # Share of a written sequence's content words that must occur in the feedback.
    grounding_min_overlap: float = Field(default=0.6, ge=0.0, le=1.0)
    # Probe questions written from the passage when the product sends none.
    self_probe_count: int = Field(default=5, ge=0, le=20)
    # For a passage, questions about its facts answered by its sentences, kept in every
    # candidate (see candidates.grounded_sequences); 0: none.
    grounded_pairs: int = Field(default=32, ge=0, le=128)
    # Each of those facts asked question-first where the sentence's grammar allows ("From which duke
    # did Quellmoor receive ...?"), answered by the span alone: "also" beside its cloze question,
    # "instead" of it. Off until an 8-update forgetting run shows it: "also" kept all of the first
    # passage and every core question over 2 updates on a CPU (bench/RESULTS.md, "Forgetting").
    question_first: AskFirst = "off"
    # Two deliveries of one feedback (a product's retried publish, a new event id) on two replicas:
    # the first claims the writing, the second waits for it, polling this often; a claim older
    # than claim_stale_s (its writer died) is taken over.
    claim_poll_s: float = Field(default=5.0, gt=0.0, le=60.0)
    claim_stale_s: float = Field(default=900.0, gt=0.0)
    # Policy adapters downloaded from the object store; None: a temporary directory.
    adapter_cache_dir: Path | None = None
    max_loaded_adapters: int = Field(default=4, ge=1, le=64)


class GeneratorSettings(ServiceSettings):
    service_name: str = "generator"
    generator: GeneratorConfig = GeneratorConfig()
