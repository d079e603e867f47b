"""Registry settings: the shared parts plus the decision knobs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shared.settings import ServiceSettings


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt SEAL_* setting is an error

    # How often undecided feedback is checked against its decision timeout.
    sweep_interval_s: float = Field(default=15.0, gt=0)
    # A candidate whose parent keeps moving is trained at most this many times in all, its first
    # training included (3: rebased at most twice).
    max_rebase_attempts: int = Field(default=3, ge=1, le=20)
    # A candidate to rebase whose self-edit has not reached the registry yet
    # (its consumer lags) waits this long for it before being rejected.
    selfedit_wait_s: float = Field(default=600.0, ge=0)
    # Bound on probes.<scope> (the evaluator's per-scope regression set).
    max_accepted_probes: int = Field(default=500, ge=1)
    # `seal ask`: answers from the scope's active adapter over the base model.
    ask_enabled: bool = True
    ask_max_new_tokens: int = Field(default=64, ge=1, le=512)
    # Questions answered one at a time: beyond this many waiting, an ask is answered 503 at once
    # (a burst queued without bound, each caller timing out while the model worked for nobody).
    ask_max_waiting: int = Field(default=16, ge=1, le=1000)
    adapter_cache_dir: Path = Path("~/.cache/seal/registry-adapters")


class RegistrySettings(ServiceSettings):
    service_name: str = "registry"
    registry: RegistryConfig = RegistryConfig()
