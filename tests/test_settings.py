"""Settings from the environment and from secret files; secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import ServiceSettings


def test_environment_and_secret_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEAL_NATS__URL", "nats://nats.seal:4222")
    monkeypatch.setenv("SEAL_NATS__USER", "trainer")
    monkeypatch.setenv("SEAL_STORE__BUCKET", "prod-adapters")
    monkeypatch.setenv("SEAL_MODEL__NAME", "Qwen/Qwen2.5-7B")
    monkeypatch.setenv("SEAL_TELEMETRY__OTLP_ENDPOINT", "http://otel:4318")
    (tmp_path / "store__secret_key").write_text("from-a-file\n")
    (tmp_path / "nats__password").write_text("nats-pass")
    settings = ServiceSettings(_secrets_dir=str(tmp_path))
    assert settings.nats.url == "nats://nats.seal:4222" and settings.nats.user == "trainer"
    assert settings.store.bucket == "prod-adapters"
    assert settings.model.name == "Qwen/Qwen2.5-7B"
    assert settings.telemetry.otlp_endpoint == "http://otel:4318"
    assert settings.store.secret_key.get_secret_value() == "from-a-file"
    assert settings.nats.password is not None and settings.nats.password.get_secret_value() == "nats-pass"
    shown = repr(settings) + str(settings.model_dump())
    assert "from-a-file" not in shown and "nats-pass" not in shown


def test_environment_wins_over_secret_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "store__secret_key").write_text("file")
    monkeypatch.setenv("SEAL_STORE__SECRET_KEY", "env")
    assert ServiceSettings(_secrets_dir=str(tmp_path)).store.secret_key.get_secret_value() == "env"


def test_defaults_point_at_the_local_stack(tmp_path: Path) -> None:
    settings = ServiceSettings(_secrets_dir=str(tmp_path / "none"))
    assert settings.nats.url == "nats://127.0.0.1:14222"
    assert settings.store.endpoint == "127.0.0.1:18333"
    assert settings.telemetry.otlp_endpoint is None


@pytest.mark.parametrize(("given", "level"), [("warn", "WARNING"), ("Debug", "DEBUG"), (" error ", "ERROR")])
def test_log_levels_are_named_as_operators_write_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, given: str, level: str) -> None:
    monkeypatch.setenv("SEAL_LOG_LEVEL", given)
    assert ServiceSettings(_secrets_dir=str(tmp_path)).log_level == level


def test_an_unknown_log_level_is_refused_at_start_with_the_choices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # uvicorn would otherwise fail later with a bare KeyError
    monkeypatch.setenv("SEAL_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="'CRITICAL', 'ERROR', 'WARNING', 'INFO' or 'DEBUG'"):
        ServiceSettings(_secrets_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "field"),
    [("SEAL_NATS__PASWORD", "nats.paswor"), ("SEAL_MODEL__DEVCE", "model.devce"), ("SEAL_STORE__SECRETKEY", "store.secretkey")],
)
def test_a_misspelt_setting_is_an_error_not_ignored(monkeypatch, tmp_path, name: str, field: str) -> None:
    """SEAL_NATS__PASWORD used to be dropped without a word, and the service ran with no password."""
    from pydantic import ValidationError

    monkeypatch.setenv(name, "x")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServiceSettings(_secrets_dir=str(tmp_path))


def test_a_misnamed_secret_file_is_an_error_not_the_default_secret(tmp_path) -> None:
    from pydantic import ValidationError

    (tmp_path / "store__secretkey").write_text("s3cr3t\n")
    with pytest.raises(ValidationError, match="secretkey"):
        ServiceSettings(_secrets_dir=str(tmp_path))
