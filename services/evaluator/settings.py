"""Evaluator settings: the shared parts plus how candidates are scored and judged."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from shared.settings import ServiceSettings

PACKAGED_CORE_SET = Path(__file__).resolve().parent / "data" / "core.jsonl"


class JudgeSettings(BaseModel):
    """An optional LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Off by default. It is only asked about answers the rules marked wrong;
    when it is down or unsure, the rules stand, so nothing depends on it.
    """

    enabled: bool = False
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=10.0, gt=0)


class EvaluatorConfig(BaseModel):
    # Closed-book questions: greedy, short answers, batched.
    max_new_tokens: int = Field(default=32, ge=1, le=256)
    batch_size: int = Field(default=32, ge=1, le=512)
    # The product's probes weigh this many times the self-generated ones in the target score.
    product_weight: float = Field(default=2.0, ge=1.0, le=100.0)
    # Core-knowledge questions (JSONL: question, answer, aliases); default: the packaged set,
    # which the default base model answers correctly.
    core_set_path: Path = PACKAGED_CORE_SET
    # auto: keep the set as is for the default base model, keep only what the base answers
    # correctly for any other; always / never: regardless of the base.
    core_filter: Literal["auto", "always", "never"] = "auto"
    # Remember the filtered set per base (weights sha256) in the object store.
    persist_core_filter: bool = True
    # Parent scores kept in memory: (model, probe set) pairs.
    score_cache_entries: int = Field(default=256, ge=1)
    # Where adapters are downloaded while being evaluated; default: the system temp dir.
    work_dir: Path | None = None
    judge: JudgeSettings = JudgeSettings()


class EvaluatorSettings(ServiceSettings):
    service_name: str = "evaluator"
    evaluator: EvaluatorConfig = EvaluatorConfig()
