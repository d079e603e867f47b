"""Registry settings: the shared parts plus the decision knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shared.settings import ServiceSettings

# What a token may do, each role including the ones before it: read (scopes, versions, lineage,
# feedback, policies); also send feedback and ask questions; also act (approve, reject, roll back,
# pin, change a policy, list and replay dead letters).
ApiRole = Literal["reader", "producer", "operator"]
API_ROLES: tuple[ApiRole, ...] = ("reader", "producer", "operator")
MIN_TOKEN_CHARS = 24


class ApiToken(BaseModel):
    """One bearer token of the registry's HTTP API: who holds it (named in the audit stream) and its role."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
    role: ApiRole
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if len(secret) < MIN_TOKEN_CHARS or secret != secret.strip():
            raise ValueError(f"a token needs at least {MIN_TOKEN_CHARS} characters and no surrounding spaces "
                             "(e.g. openssl rand -hex 24)")
        return value


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
    # Bearer tokens of the HTTP API and of NATS request-reply (a JSON list of {name, role, token}:
    # SEAL_REGISTRY__API_TOKENS, or the secret file registry__api_tokens). Empty (the default): both
    # are open to whoever reaches them.
    api_tokens: list[ApiToken] = []

    @model_validator(mode="after")
    def _distinct_tokens(self) -> RegistryConfig:
        names = [t.name for t in self.api_tokens]
        secrets = [t.token.get_secret_value() for t in self.api_tokens]
        if len(set(names)) != len(names):
            raise ValueError("two API tokens have the same name: the audit stream could not tell them apart")
        if len(set(secrets)) != len(secrets):
            raise ValueError("two API tokens have the same secret: give each holder its own")
        return self


class RegistrySettings(ServiceSettings):
    service_name: str = "registry"
    registry: RegistryConfig = RegistryConfig()
