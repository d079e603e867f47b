"""The CLI's service launcher: what environment each service process gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal import cli, processes
from seal.stack import LocalStack, StackPorts
from services.trainer.settings import TrainerSettings


def launched_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defaults: dict[str, str] | None) -> dict[str, str]:
    seen: dict[str, dict[str, str]] = {}

    class RecordingPopen:
        def __init__(self, args: list[str], env: dict[str, str], **_: object) -> None:
            seen[args[-1]] = env

    monkeypatch.setattr(processes.subprocess, "Popen", RecordingPopen)
    (tmp_path / "logs").mkdir(exist_ok=True)
    processes.start_services(LocalStack(tmp_path, StackPorts.free()), tmp_path, "tiny", ("trainer",), defaults=defaults)
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
    assert cli.service_defaults("cpu") == {**cli.SHARED_CPU_SETTINGS, **cli.DEMO_CPU_SETTINGS}


def test_services_sharing_cpu_cores_get_idle_threads_that_sleep_and_the_trainers_rehearsal_unless_light() -> None:
    # `seal up`: the four services on one CPU, with the trainer's own rehearsal.
    assert cli.service_defaults("cpu", light_rehearsal=False) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cli.service_defaults("cpu")["OMP_WAIT_POLICY"] == "PASSIVE"
    # On a GPU neither applies; a bench's own settings still do.
    assert cli.service_defaults("cuda") == {}
    assert cli.service_defaults("cuda", {"A": "1"}) == {"A": "1"}


def test_parse_env_reads_key_value_items_and_refuses_anything_else() -> None:
    assert cli.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            cli.parse_env([bad])


def test_seal_up_runs_the_services_with_idle_threads_that_sleep_and_the_trainers_own_rehearsal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    started: dict[str, object] = {}

    class StubStack:  # the embedded stack itself is tested in test_stack.py
        def __init__(self, home: Path) -> None:
            self.home = home

        def start(self) -> StubStack:
            return self

        def stop(self) -> None:
            started["stopped"] = True

    def record_and_stop(stack: object, home: Path, model: str, names: tuple[str, ...], **kw: object) -> dict:
        started.update(model=model, names=names, defaults=kw.get("defaults"))
        raise KeyboardInterrupt  # Ctrl-C: `up` stops what it started

    monkeypatch.setattr(cli, "LocalStack", StubStack)
    monkeypatch.setattr(cli, "provision", lambda stack: None)
    monkeypatch.setattr(cli, "start_services", record_and_stop)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    monkeypatch.delenv("SEAL_MODEL__DEVICE", raising=False)
    result = CliRunner().invoke(cli.app, ["up", "--home", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert started["names"] == cli.SERVICES and started["stopped"]
    assert started["defaults"] == cli.service_defaults("auto", light_rehearsal=False)
    assert not set(cli.DEMO_CPU_SETTINGS) & set(started["defaults"])  # type: ignore[arg-type]


def test_every_demo_starts_from_an_empty_folder_unless_one_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / cli.DEMO_HOME / "nats" / "left-over"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("a killed demo's unfinished work")
    assert cli.demo_home(None) == (tmp_path / cli.DEMO_HOME).resolve()
    assert not (tmp_path / cli.DEMO_HOME).exists()  # the stack creates it again
    named = tmp_path / "kept"
    (named / "nats").mkdir(parents=True)
    assert cli.demo_home(named) == named.resolve() and (named / "nats").is_dir()


def test_the_demo_asks_for_one_candidate_per_feedback_on_a_cpu_only() -> None:
    from shared.registry_view import ScopePolicy

    policy = ScopePolicy.model_validate(cli.demo_policy("cpu"))  # settings the registry takes
    assert policy.candidates == 1 and policy.strength_ladder == (0.75,)
    assert cli.demo_policy("cuda") == {}


def test_the_demo_refuses_unreadable_data_before_it_starts_anything(tmp_path) -> None:
    from typer.testing import CliRunner

    from seal.cli import app

    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    for data in (tmp_path / "missing.jsonl", broken):
        result = CliRunner().invoke(app, ["demo", "--data", str(data), "--home", str(tmp_path / "home")])
        assert result.exit_code == 2 and "cannot read the demo data" in result.output
    assert not (tmp_path / "home").exists()  # no stack was started


def test_a_demo_leaves_the_data_of_one_still_running_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo empties its folder at every start, but not while its ports are taken (another demo,
    or a `seal up`, still running on that data): it says so and stops first."""
    import socket

    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    live = tmp_path / cli.DEMO_HOME / "nats" / "jetstream"
    live.mkdir(parents=True)
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", StackPorts().nats))
        holder.listen()
    except OSError:
        pass  # taken already, which serves as well
    try:
        result = CliRunner().invoke(cli.app, ["demo"])
    finally:
        holder.close()
    assert result.exit_code == 1 and "ports are taken" in result.output and f"nats={StackPorts().nats}" in result.output
    assert live.is_dir()


def test_the_cli_reads_the_model_settings_the_services_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEAL_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("SEAL_MODEL__DTYPE", "bfloat16")
    monkeypatch.setenv("SEAL_MODEL__CACHE_DIR", str(tmp_path))
    settings = cli.model_settings("tiny")
    assert (settings.name, settings.device, settings.dtype, settings.cache_dir) == ("tiny", "cpu", "bfloat16", tmp_path)
    monkeypatch.delenv("SEAL_MODEL__DEVICE")
    assert cli.model_settings("default").device == "auto"


def test_seal_up_stops_everything_when_a_service_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from typer.testing import CliRunner

    stopped: list[bool] = []

    class StubStack:
        def __init__(self, home: Path) -> None:
            pass

        def start(self) -> StubStack:
            return self

        def stop(self) -> None:
            stopped.append(True)

        def exited(self) -> None:
            return None

        def nats_healthy(self) -> bool:
            return True

        s3_healthy = nats_healthy
        nats_url, s3_endpoint, bucket, data_dir = "nats://stub", "stub", "stub", tmp_path

    def crashing_trainer(*args: object, **kwargs: object) -> dict[str, subprocess.Popen]:
        return {"trainer": subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])}

    monkeypatch.setattr(cli, "LocalStack", StubStack)
    monkeypatch.setattr(cli, "provision", lambda stack: None)
    monkeypatch.setattr(cli, "start_services", crashing_trainer)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    result = CliRunner().invoke(cli.app, ["up", "--home", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 1
    assert "the trainer service exited (code 3)" in result.output and "trainer.log" in result.output
    assert stopped == [True]


def test_a_second_ctrl_c_does_not_cut_the_shutdown_short() -> None:
    """Stopping the services takes up to 30 s; a Ctrl-C meanwhile must not leave the servers up."""
    import os
    import signal

    done: list[str] = []

    class Stack:
        def stop(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
            done.append("servers stopped")

    before = signal.getsignal(signal.SIGINT)
    processes.shut_down({}, Stack())  # type: ignore[arg-type]
    assert done == ["servers stopped"]
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C works again afterwards


def test_under_nohup_the_cli_outlives_its_terminal() -> None:
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup hands down
        processes.stop_on_sigterm()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        processes.stop_on_sigterm()
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)  # the terminal closed: stop cleanly
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class ServersUp:
    """A stand-in for the embedded stack whose servers answer (the stack itself: test_stack.py)."""

    stopped: list[bool]

    def __init__(self, home: Path) -> None:
        self.stopped = []
        self.nats_url, self.s3_endpoint, self.bucket, self.data_dir = "nats://stub", "stub", "stub", home

    def start(self) -> ServersUp:
        return self

    def stop(self) -> None:
        self.stopped.append(True)

    def exited(self) -> None:
        return None

    def nats_healthy(self) -> bool:
        return True

    def s3_healthy(self) -> bool:
        return True


def test_seal_up_says_ready_only_once_the_services_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from typer.testing import CliRunner

    said: list[str] = []
    monkeypatch.setattr(cli, "LocalStack", ServersUp)
    monkeypatch.setattr(cli, "provision", lambda stack: None)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    monkeypatch.setattr(cli, "start_services", lambda *a, **k: {"trainer": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])})

    def never_ready(procs: dict, **kw: object) -> None:
        said.append("waited")
        raise TimeoutError("services not ready after 600s: trainer")

    monkeypatch.setattr(cli, "wait_services_ready", never_ready)
    result = CliRunner().invoke(cli.app, ["up", "--home", str(tmp_path), "--model", "tiny"])
    assert said == ["waited"] and result.exit_code == 1
    assert "not ready after 600s: trainer" in result.output and "ready in" not in result.output


def test_seal_status_fails_while_a_service_is_down_or_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    monkeypatch.setattr(cli, "LocalStack", lambda home, ports: ServersUp(home))
    states = {"registry": "ready", "generator": "ready", "trainer": "starting", "evaluator": "down"}
    monkeypatch.setattr(cli, "service_readiness", lambda: states)
    result = CliRunner().invoke(cli.app, ["status"])
    assert result.exit_code == 1
    assert "starting" in result.output and "down" in result.output and "18082" in result.output
    monkeypatch.setattr(cli, "service_readiness", lambda: dict.fromkeys(cli.SERVICES, "ready"))
    assert CliRunner().invoke(cli.app, ["status"]).exit_code == 0
    monkeypatch.setattr(cli, "service_readiness", lambda: dict.fromkeys(cli.SERVICES, "down"))
    none = CliRunner().invoke(cli.app, ["status"])
    assert none.exit_code == 1 and "--servers-only" in none.output
    assert CliRunner().invoke(cli.app, ["status", "--servers-only"]).exit_code == 0  # after `seal up --no-services`


def test_service_readiness_asks_each_service_where_seal_up_runs_it() -> None:
    # nothing listens on these ports here: every service is down
    assert processes.service_readiness(port_base=processes.free_service_port_base()) == dict.fromkeys(processes.SERVICES, "down")


@pytest.mark.parametrize("failure", [OSError("tiny-typo is not a local folder nor a hub id"), ValueError("the model has no chat template")])
def test_a_demo_whose_model_does_not_load_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    from typer.testing import CliRunner

    stack = ServersUp(tmp_path)
    monkeypatch.setattr(cli, "LocalStack", lambda home: stack)
    monkeypatch.setattr(cli, "provision", lambda stack: None)
    monkeypatch.setattr(cli, "start_services", lambda *a, **k: {})
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)

    def fails(settings: object) -> None:
        raise failure

    monkeypatch.setattr("shared.models.load_model", fails)  # imported by the demo when it runs
    result = CliRunner().invoke(cli.app, ["demo", "--home", str(tmp_path / "demo")])
    assert result.exit_code == 1 and "demo failed:" in result.output and str(failure) in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert stack.stopped == [True]


def test_the_shells_nats_and_s3_settings_stay_out_of_the_local_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exported for an external NATS or MinIO (3 replicas, TLS), they made the local services fail."""
    monkeypatch.setenv("SEAL_NATS__STREAM_REPLICAS", "3")
    monkeypatch.setenv("SEAL_STORE__SECURE", "true")
    monkeypatch.setenv("SEAL_TRAINER__REHEARSAL_BATCH", "8")  # the services' own settings still come through
    env = launched_env(tmp_path, monkeypatch, None)
    assert "SEAL_NATS__STREAM_REPLICAS" not in env and "SEAL_STORE__SECURE" not in env
    assert env["SEAL_NATS__URL"].startswith("nats://127.0.0.1:") and env["SEAL_TRAINER__REHEARSAL_BATCH"] == "8"


def test_a_server_of_the_stack_that_exits_is_noticed_like_a_service(tmp_path: Path) -> None:
    import subprocess
    import sys

    stack = LocalStack(tmp_path, StackPorts.free())
    stack._procs["nats"] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    stack._procs["nats"].wait()
    said = processes.exited_service({}, tmp_path, stack)
    assert said is not None and "nats exited (code 2)" in said and "nats.log" in said
    assert processes.exited_service({}, tmp_path) is None  # without the stack: the services only


def test_seal_up_refuses_service_ports_in_use_before_it_starts_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service binds its port once its model is loaded: a clash showed minutes later as an exit."""
    import socket

    from typer.testing import CliRunner

    started: list[bool] = []

    class Stack(ServersUp):
        def start(self) -> ServersUp:
            started.append(True)
            return self

    monkeypatch.setattr(cli, "LocalStack", Stack)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", processes.SERVICE_PORT_BASE + 1))
        except OSError:
            pytest.skip("the port is in use by something else here")
        held.listen()
        result = CliRunner().invoke(cli.app, ["up", "--home", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 1 and started == []
    assert f"generator={processes.SERVICE_PORT_BASE + 1}" in " ".join(result.output.split())
