"""The CLI's service launcher: what environment each service process gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal import cli
from seal.stack import LocalStack, StackPorts
from services.trainer.settings import TrainerSettings


def launched_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defaults: dict[str, str] | None) -> dict[str, str]:
    seen: dict[str, dict[str, str]] = {}

    class RecordingPopen:
        def __init__(self, args: list[str], env: dict[str, str], **_: object) -> None:
            seen[args[-1]] = env

    monkeypatch.setattr(cli.subprocess, "Popen", RecordingPopen)
    (tmp_path / "logs").mkdir(exist_ok=True)
    cli.start_services(LocalStack(tmp_path, StackPorts.free()), tmp_path, "tiny", ("trainer",), defaults=defaults)
    return seen["services.trainer"]


def test_the_demos_cpu_settings_reach_the_trainer_and_give_way_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEAL_TRAINER__REHEARSAL_BATCH", "8")
    env = launched_env(tmp_path, monkeypatch, cli.DEMO_CPU_SETTINGS)
    assert env["SEAL_TRAINER__REHEARSAL_BATCH"] == "8"  # the caller's own setting wins
    assert env["SEAL_TRAINER__REHEARSAL_WEIGHT"] == "1.0" and env["SEAL_MODEL__NAME"] == "tiny"
    for name, value in env.items():
        if name.startswith("SEAL_TRAINER__"):
            monkeypatch.setenv(name, value)
    config = TrainerSettings(_secrets_dir=str(tmp_path / "none")).trainer
    assert (config.rehearsal_pairs, config.rehearsal_weight, config.rehearsal_batch) == (64, 1.0, 8)


def test_without_defaults_the_services_get_the_trainers_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cli.DEMO_CPU_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    env = launched_env(tmp_path, monkeypatch, None)
    assert not any(name in env for name in cli.DEMO_CPU_SETTINGS)
    config = TrainerSettings(_secrets_dir=str(tmp_path / "none")).trainer
    assert (config.rehearsal_pairs, config.rehearsal_weight, config.rehearsal_batch) == (256, 3.0, 16)


def test_service_defaults_take_the_light_rehearsal_on_a_cpu_and_a_benchs_extra_settings() -> None:
    on_cpu = cli.service_defaults("cpu", {"OMP_WAIT_POLICY": "PASSIVE", "SEAL_TRAINER__REHEARSAL_BATCH": "2"})
    assert on_cpu["OMP_WAIT_POLICY"] == "PASSIVE"
    assert on_cpu["SEAL_TRAINER__REHEARSAL_BATCH"] == "2"  # the bench's setting over the demo's
    assert on_cpu["SEAL_TRAINER__REHEARSAL_PAIRS"] == cli.DEMO_CPU_SETTINGS["SEAL_TRAINER__REHEARSAL_PAIRS"]
    assert cli.service_defaults("cpu") == cli.DEMO_CPU_SETTINGS


def test_parse_env_reads_key_value_items_and_refuses_anything_else() -> None:
    assert cli.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            cli.parse_env([bad])
