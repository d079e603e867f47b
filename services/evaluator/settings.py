"""Evaluator settings: the shared parts plus how candidates are scored and judged."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.settings import ServiceSettings

PACKAGED_CORE_SET = Path(__file__).resolve().parent / "data" / "core.jsonl"


class JudgeSettings(BaseModel):
    """An optional LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Off by default. It is only asked about answers the rules marked wrong;
    when it is down or unsure, the rules stand, so nothing depends on it.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt SEAL_* setting is an error

    enabled: bool = False
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=10.0, gt=0)


class EvaluatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt SEAL_* setting is an error

    # Closed-book questions: greedy, short answers, batched.
    max_new_tokens: int = Field(default=32, ge=1, le=256)
    batch_size: int = Field(default=32, ge=1, le=512)
    # The product's probes weigh this many times the self-generated ones in the target score.
    product_weight: float = Field(default=2.0, ge=1.0, le=100.0)
    # Core-knowledge questions (JSONL: question, answer, aliases); default: the packaged set,
    # chosen as questions the default base model (SmolLM2-135M-Instruct) answers correctly.
    core_set_path: Path = PACKAGED_CORE_SET
    # never: ask every question, so the regression gate weighs the net change (see
    # core_knowledge.py for why); always: keep only the questions this base answers correctly
    # under this scoring (one pass at startup, remembered per base; the default base answers
    # 98 of the 107 packaged ones with 32 new tokens); auto: trust the packaged set for the
    # default base, filter for any other.
    core_filter: Literal["always", "auto", "never"] = "never"
    # Remember the filtered set per base (weights sha256) in the object store.
    persist_core_filter: bool = True
    # Parent scores kept in memory: (model, probe set) pairs.
    score_cache_entries: int = Field(default=256, ge=1)
    # Where adapters are downloaded while being evaluated (in a folder per process, what a killed
    # one left removed at the next start); default: seal-evaluator in the system temp dir.
    work_dir: Path | None = None
    judge: JudgeSettings = JudgeSettings()


class EvaluatorSettings(ServiceSettings):
    service_name: str = "evaluator"
    evaluator: EvaluatorConfig = EvaluatorConfig()
