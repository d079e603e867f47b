"""The ``seal`` command: run the embedded stack, and operate the platform.

    seal up              start nats-server, the S3 server and the services; Ctrl-C stops all
    seal up --check      start nats-server and the S3 server only, show their health, stop
    seal status          are the stack's servers and its four services up and ready?

The service processes (start, readiness, stop) are seal.processes; the operator commands
(submit, scopes, approve, ...) are seal.ops, seal.submit, seal.scope_policy and seal.dead_letters.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

# Imported by name: the commands below look them up here (tests swap them on this module).
from seal.processes import (
    SERVICES,
    busy_service_ports,
    console,
    exited_service,
    service_readiness,
    service_url,
    shut_down,
    start_services,
    stop_on_sigterm,
    wait_services_ready,
)
from seal.stack import LocalStack, StackPorts
from shared.broker import ensure_streams_at
from shared.settings import ModelSettings
from shared.store import AdapterStore

app = typer.Typer(help="SEAL platform: self-adapting language models.", no_args_is_help=True)

# The demo on a CPU: the trainer's default rehearsal (158 base answers, 16 per step, weight 3)
# makes one update of the default model take 9-10 minutes on 2 cores; the demo holds the model
# with the lighter one (64 answers, 4 per step, weight 1: 3-4 minutes) so that the demo's two
# passages take 8 to 12 minutes (bench/RESULTS.md, "Demo"). It forgets more. Variables set in
# the environment win.
DEMO_CPU_SETTINGS = {
    "SEAL_TRAINER__REHEARSAL_PAIRS": "64",
    "SEAL_TRAINER__REHEARSAL_WEIGHT": "1.0",
    "SEAL_TRAINER__REHEARSAL_BATCH": "4",
}
# The four services on one machine's CPU cores (`seal up`, the demo, the benches): a training, an
# evaluation and a generation overlap, and OpenMP threads that spin while idle (libgomp's default)
# take the cores from the busy ones: a training's steps and an evaluation's questions ran about
# 5x slower side by side. Threads that sleep when idle cost a service that runs alone between
# nothing and ~25% in two measurements (bench/RESULTS.md, "Knowledge incorporation"). On
# Kubernetes each service has its own cores.
SHARED_CPU_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}


def on_cpu(device: str) -> bool:
    """Whether the model setting ``device`` ("auto", "cpu", "cuda", ...) runs on this machine's CPU."""
    from shared.models import resolve_device

    return resolve_device(device).type == "cpu"


def service_defaults(
    device: str = "auto", extra: Mapping[str, str] | None = None, *, light_rehearsal: bool = True
) -> dict[str, str]:
    """The services' environment defaults for a run on ``device`` (a model setting) with all four
    on one machine: on a CPU, threads that give way to each other and (``light_rehearsal``) the
    demo's lighter rehearsal; then ``extra`` (``KEY=VALUE`` settings a bench passes)."""
    if not on_cpu(device):
        return dict(extra or {})
    return {**SHARED_CPU_SETTINGS, **(DEMO_CPU_SETTINGS if light_rehearsal else {}), **(extra or {})}


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict of environment variables (ValueError on anything else)."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"want KEY=VALUE, got {item!r}")
        env[key.strip()] = value
    return env


HomeOption = typer.Option(
    Path(".seal"), "--home", envvar="SEAL_HOME", help="Folder holding all local stack data."
)


def provision(stack: LocalStack) -> None:
    """Streams, KV buckets and the adapter bucket: idempotent."""
    asyncio.run(ensure_streams_at(stack.nats_settings()))
    AdapterStore.from_settings(stack.store_settings()).ensure_bucket()


def health_table(
    stack: LocalStack, services: dict[str, subprocess.Popen] | None = None, readiness: dict[str, str] | None = None
) -> Table:
    table = Table(title="SEAL local stack")
    table.add_column("component")
    table.add_column("address")
    table.add_column("state")
    ok = "[green]healthy[/]"
    bad = "[red]down[/]"
    table.add_row("nats-server (JetStream)", stack.nats_url, ok if stack.nats_healthy() else bad)
    table.add_row("S3 (SeaweedFS)", f"http://{stack.s3_endpoint}  bucket {stack.bucket}", ok if stack.s3_healthy() else bad)
    for name, proc in (services or {}).items():
        state = ok.replace("healthy", "running") if proc.poll() is None else f"[red]exited {proc.returncode}[/]"
        table.add_row(f"service: {name}", f"pid {proc.pid}", state)
    for name, said in (readiness or {}).items():
        color = {"ready": "green", "starting": "yellow"}.get(said, "red")
        table.add_row(f"service: {name}", service_url(name), f"[{color}]{said}[/]")
    table.caption = f"data: {stack.data_dir}"
    return table


def model_settings(name: str) -> ModelSettings:
    """The model settings the services will run with: ``name``, and the rest from the same
    ``SEAL_MODEL__*`` variables they read (device, dtype, cache folder, threads)."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class FromEnvironment(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="SEAL_", env_nested_delimiter="__", extra="ignore")
        model: ModelSettings = ModelSettings()

    return FromEnvironment().model.model_copy(update={"name": name})


@app.command()
def up(
    home: Path = HomeOption,
    check: bool = typer.Option(False, "--check", help="Start nats-server and the S3 server only (not the services), show their health, then stop."),
    services: bool = typer.Option(True, "--services/--no-services", help="Also run the four services."),
    model: str = typer.Option("default", "--model", envvar="SEAL_MODEL__NAME", help="Base model: default, tiny, a hub id or a path."),
) -> None:
    """Start the embedded stack (and the services) and keep it running until Ctrl-C."""
    stop_on_sigterm()
    home = home.resolve()
    stack = LocalStack(home)
    started = time.monotonic()
    if services and not check and (busy := busy_service_ports()):
        console.print(f"[red]the services' ports are taken ({', '.join(busy)}):[/] is another `seal up` or demo "
                      "still running? Stop it first.")
        raise typer.Exit(1)
    with console.status("starting nats-server and the S3 server..."):
        try:
            stack.start()
        except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
            console.print(f"[red]could not start the stack:[/] {exc}")
            raise typer.Exit(1) from exc
    procs: dict[str, subprocess.Popen] = {}
    try:
        provision(stack)
        if services and not check:
            defaults = service_defaults(model_settings(model).device, light_rehearsal=False)
            procs = start_services(stack, home, model, SERVICES, defaults=defaults)
            with console.status("the services are loading the model..."):
                wait_services_ready(procs)
        console.print(health_table(stack, procs))
        console.print(f"ready in {time.monotonic() - started:.1f}s; logs in {home / 'logs'}")
        if check:
            if not (stack.nats_healthy() and stack.s3_healthy()):
                raise typer.Exit(1)
            return
        console.print("press Ctrl-C to stop")
        while True:
            time.sleep(1)
            if gone := exited_service(procs, home, stack):
                console.print(f"[red]{gone}[/]; stopping the rest")
                raise typer.Exit(1)
    except typer.Exit:
        raise  # said already (typer.Exit is a RuntimeError)
    except (RuntimeError, TimeoutError) as exc:  # a service that exited or never became ready
        console.print(f"[red]{exited_service(procs, home, stack) or exc}[/]; logs in {home / 'logs'}")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        shut_down(procs, stack)
        console.print("stopped; data kept in", str(home))


DEMO_HOME = Path(".seal-demo")
# The demo's scope policy on a CPU: one self-edit candidate per feedback, trained at three-quarter
# strength. Three candidates with different data are three trainings of 4-6 minutes each on 2
# cores (a demo whose first passage's candidates kept two sets of data had not decided it after
# 15 minutes; one whose three kept the same data, and took the ladder's strengths, finished in
# 15). Each rung of the ladder is one more evaluation (about a minute here), and at full strength
# with the light rehearsal a passage lost 4 core questions and was refused; the 0.75 rung is the
# one that passed in the earlier demos (bench/RESULTS.md, "Demo"), so it is the demo's only one.
# On a GPU the policy's defaults stand.
DEMO_CPU_POLICY: dict[str, object] = {"candidates": 1, "strength_ladder": [0.75]}


def demo_policy(device: str) -> dict[str, object]:
    """What the demo sets on its scope's policy before the first feedback, on ``device``."""
    return dict(DEMO_CPU_POLICY) if on_cpu(device) else {}


def demo_home(home: Path | None) -> Path:
    """Where the demo keeps its stack: a folder named with ``--home`` as it is (the demo goes on from
    its scope's active version there); by default ``.seal-demo``, emptied first, so that every demo
    starts from the base model with nothing of an earlier run left to redeliver."""
    if home is not None:
        return home.resolve()
    if DEMO_HOME.exists():
        shutil.rmtree(DEMO_HOME)
    return DEMO_HOME.resolve()


@app.command()
def demo(
    home: Path | None = typer.Option(
        None, "--home", help="Folder for the stack's data, kept as it is. Default: .seal-demo, emptied at every start."
    ),
    model: str = typer.Option("default", "--model", envvar="SEAL_MODEL__NAME", help="Base model for all services."),
    data: Path = typer.Option(None, "--data", help="Passages with questions, one JSON object a line as in seal/data/demo.jsonl; default: that demo set."),
    scope: str = typer.Option("demo", "--scope", help="Scope (adapter line) the demo teaches."),
) -> None:
    """Run the whole loop on the embedded stack: feedback in, adapter versions out."""
    stop_on_sigterm()
    from seal.demo import DEMO_DATA, load_items, run_demo
    from shared.models import load_model

    try:
        items = load_items(data or DEMO_DATA)
    except (OSError, ValueError) as exc:
        console.print(Text.assemble(("cannot read the demo data: ", "red"), str(exc)))
        raise typer.Exit(2) from exc
    if home is None and (busy := StackPorts().busy() + busy_service_ports()):
        # Before the folder is emptied: it may be the data of the demo that holds these ports.
        console.print(f"[red]the demo's ports are taken ({', '.join(busy)}):[/] is another demo or `seal up` still "
                      f"running? Stop it first ({DEMO_HOME} is left as it is).")
        raise typer.Exit(1)
    # The default folder is emptied at every start, so the same feedback ids (and so the same
    # sampled self-edits) can be used each time: the demo repeats. A kept folder needs new ones.
    seed = 0 if home is None else None
    home = demo_home(home)
    settings = model_settings(model)
    stack = LocalStack(home)
    procs: dict[str, subprocess.Popen] = {}
    try:
        with console.status("starting nats-server, the S3 server and the four services..."):
            stack.start()
            provision(stack)
            procs = start_services(stack, home, model, SERVICES, defaults=service_defaults(settings.device))
            lm = load_model(settings)
            wait_services_ready(procs)
        console.print(health_table(stack, procs))
        if policy := demo_policy(settings.device):
            from seal.client import call

            call(service_url("registry"), "PATCH", f"/v1/scopes/{scope}/policy", policy,
                 params={"operator": "seal demo", "reason": "the demo on a CPU: fewer trainings (DEMO_CPU_POLICY)"})
            console.print(f"on a CPU the demo sets scope {scope!r}'s policy to {policy} (fewer trainings: DEMO_CPU_POLICY)")
        result = asyncio.run(
            run_demo(items, nats_settings=stack.nats_settings(), store_settings=stack.store_settings(), lm=lm, scope=scope,
                     console=console, exited=lambda: exited_service(procs, home, stack), seed=seed)
        )
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise  # said already, with its own status (typer.Exit is a RuntimeError)
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:  # OSError, ValueError: a model that does not load
        console.print(f"[red]demo failed:[/] {exc}; logs in {home / 'logs'}")
        raise typer.Exit(1) from exc
    finally:
        shut_down(procs, stack)
    undecided = [item for item, outcome in result["outcomes"].items() if outcome.startswith("no decision")]
    if undecided:
        console.print(f"[red]no decision in time for {', '.join(undecided)}[/]; logs in {home / 'logs'}")
        raise typer.Exit(1)


@app.command()
def status(
    home: Path = HomeOption,
    servers_only: bool = typer.Option(
        False, "--servers-only", help="Check nats-server and the S3 server only (a stack started with --no-services)."
    ),
) -> None:
    """Show whether the local stack's servers answer and its services are ready (exit 1 if not)."""
    stack = LocalStack(home.resolve(), StackPorts())
    readiness = {} if servers_only else service_readiness()
    console.print(health_table(stack, readiness=readiness))
    if readiness and set(readiness.values()) == {"down"}:
        console.print("no service answers: `seal up` starts them (with --no-services it does not: check with --servers-only)")
    if not (stack.nats_healthy() and stack.s3_healthy()) or any(state != "ready" for state in readiness.values()):
        raise typer.Exit(1)


# The operator commands (submit, versions, approve, ...): imported here, at the end, because
# they register on ``app``; a missing dependency is an error, not commands quietly gone.
from seal import dead_letters, ops  # noqa: E402

ops.register(app)
dead_letters.register(app)


if __name__ == "__main__":
    app()
