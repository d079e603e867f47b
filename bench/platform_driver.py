"""Driving the running platform from a benchmark: the shared half of the knowledge and forgetting benches.

* :func:`running_platform` starts the embedded stack (nats-server, SeaweedFS) and the four
  services as separate processes in a new folder, and stops them however the block ends;
* :func:`submit_passage` sends a passage as feedback (never its questions) and waits for the
  decision, as a product and ``seal watch`` would see it;
* :func:`set_scope_policy` changes a scope's policy as ``seal scope-policy set`` would;
* :func:`answers_with` asks question sets closed-book with an adapter on the base, with the
  evaluator's own scoring;
* the command-line options both benches share (``--service-env``, ``--dtype``) and what they
  become: the services' environment, the bench's own model settings, the machine line of a report.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from seal.cli import parse_env, service_defaults  # noqa: E402
from seal.demo import DemoItem  # noqa: E402
from services.evaluator.settings import PACKAGED_CORE_SET as CORE  # noqa: E402
from shared.events import Probe  # noqa: E402
from shared.lora import AdapterHost  # noqa: E402
from shared.models import LoadedModel  # noqa: E402
from shared.scoring import ClosedBookResult, closed_book_accuracy  # noqa: E402
from shared.settings import ModelSettings  # noqa: E402

RESULTS = REPO / "bench" / "results"
__all__ = [
    "CORE",
    "RESULTS",
    "Platform",
    "add_service_env_option",
    "answers_with",
    "machine_label",
    "model_settings_of",
    "running_platform",
    "service_env_of",
    "set_scope_policy",
    "submit_passage",
]


def answers_with(
    lm: LoadedModel, host: AdapterHost, directory: Path | None, question_sets: Sequence[Sequence[Probe]]
) -> list[ClosedBookResult]:
    """Each set asked closed-book with ``directory``'s adapter on the base (or the base alone)."""
    if directory is None:
        return [closed_book_accuracy(lm, questions) for questions in question_sets]
    with host.applied("bench", directory):
        return [closed_book_accuracy(lm, questions) for questions in question_sets]


@contextmanager
def downloaded(store: Any, ref: Any) -> Iterator[Path | None]:
    """A stored adapter (``ref``, a ManifestRef; None: none) in a temporary folder, checked on
    download and removed afterwards: a run of 8 updates kept 8 copies of tens of MB each."""
    if ref is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="seal-bench-adapter-") as folder:
        directory = Path(folder) / "adapter"
        store.get_adapter(ref, directory)
        yield directory


@dataclass
class Platform:
    """The embedded stack with the four services running on it."""

    stack: Any  # seal.stack.LocalStack
    store: Any  # shared.store.AdapterStore
    port_base: int  # service i listens on port_base + i (seal.processes.SERVICES order)


@contextmanager
def running_platform(model: str, service_env: dict[str, str] | None, prefix: str, home: Path | None = None,
                     before_services: Callable[[Any], None] | None = None) -> Iterator[Platform]:
    """Start the stack and the four services, in a new folder or in ``home`` (a stopped run's, to
    go on with its data: NATS's streams and KV, the stored adapters); stop them however the block
    ends. ``before_services(stack)`` runs once the stack is up and provisioned, before any
    service starts."""
    from seal.cli import provision
    from seal.processes import (
        SERVICES,
        free_service_port_base,
        start_services,
        stop_services,
        wait_services_ready,
    )
    from seal.stack import LocalStack, StackPorts
    from shared.store import AdapterStore

    home = home or Path(tempfile.mkdtemp(prefix=prefix))
    stack = LocalStack(home, StackPorts.free()).start()
    procs = {}
    try:
        provision(stack)
        if before_services is not None:
            before_services(stack)
        (home / "logs").mkdir(exist_ok=True)
        port_base = free_service_port_base()  # beside another stack (a demo, another bench)
        procs = start_services(stack, home, model, SERVICES, port_base, defaults=service_env)
        wait_services_ready(procs, port_base=port_base)
        yield Platform(stack, AdapterStore.from_settings(stack.store_settings()), port_base)
    finally:
        stop_services(procs)
        stack.stop()


async def drop_work_in_flight(stack: Any) -> list[str]:
    """Terminate what the services' consumers hold undone (a stopped run's trainings and
    evaluations), so that a resumed run does not spend its CPU on an update it will submit again;
    what was dropped, by consumer. The registry's own consumers are left: it records, it does not work."""
    import nats.errors

    from shared.connections import connect_nats
    from shared.subjects import EVENTS_STREAM

    dropped: list[str] = []
    nc = await connect_nats(stack.nats_settings())
    try:
        js = nc.jetstream()
        for info in await js.consumers_info(EVENTS_STREAM):
            name = info.name
            if name.startswith("registry") or not (info.num_pending or info.num_ack_pending):
                continue
            sub = await js.pull_subscribe_bind(durable=name, stream=EVENTS_STREAM)
            count = 0
            # A message the stopped run's service held comes back once its ack wait has passed.
            deadline = time.monotonic() + (info.config.ack_wait or 30.0) + 5.0
            while time.monotonic() < deadline:
                try:
                    messages = await sub.fetch(batch=16, timeout=2)
                except (TimeoutError, nats.errors.TimeoutError):
                    messages = []
                for message in messages:
                    await message.term()
                    count += 1
                now = await js.consumer_info(EVENTS_STREAM, name)
                if not (now.num_pending or now.num_ack_pending):
                    break
            await sub.unsubscribe()
            dropped.append(f"{name}: {count}")
    finally:
        await nc.close()
    return dropped


def set_scope_policy(platform: Platform, scope: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Change some of ``scope``'s policy through the registry's API; the policy as it now stands."""
    from seal.client import call
    from seal.processes import service_url

    return call(service_url("registry", platform.port_base), "PATCH", f"/v1/scopes/{scope}/policy", changes,
                params={"operator": "bench", "reason": "the benchmark's settings for this run"})


async def submit_passage(watcher: Any, scope: str, item: DemoItem, timeout: float, seed: int = 0,
                         feedback_id: str | None = None) -> tuple[Any, float]:
    """Send a passage (and its title, never its questions) as feedback to ``scope`` and wait for
    its decision: (its progress, as seal.watch sees it; seconds waited). A feedback still open
    after ``timeout`` is returned as it stands.

    The feedback id comes from ``seed`` and the passage's id: the generator samples a feedback's
    self-edits from its id, so the same seed gives the same self-edits (a run can be repeated) and
    another seed another sample of them (how much a result owes to one sample); ``feedback_id``
    overrides it (a resumed run's update submitted again)."""
    from shared import events as ev

    event = ev.FeedbackSubmitted(
        feedback_id=feedback_id or bench_feedback_id(seed, item), scope=scope,
        content=ev.KnowledgeFeedback(title=item.title, passage=item.passage), submitted_by="bench",
    )
    started = time.monotonic()
    await watcher.submit(event)
    progress = watcher.progress[event.feedback_id]
    try:
        await watcher.wait_until(lambda: progress.decided, timeout)
    except TimeoutError:
        pass
    return progress, time.monotonic() - started


def bench_feedback_id(seed: int, item: DemoItem, *again: object) -> str:
    """The feedback id of ``item`` in a run with ``seed``; ``again`` for a resubmission."""
    from shared import events as ev

    return ev.derived_id("bench", seed, item.id, *again)


def add_service_env_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the services (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights' dtype in the services and in the bench's own scoring (auto: bf16 on a GPU, "
                        "float32 on a CPU); float32 on a GPU matches the CPU's numbers")


def machine_label(lm: LoadedModel) -> str:
    """Where a bench ran: processor, cores, torch, the weights' device and dtype, and the GPU's name when the model is on one."""
    import os
    import platform

    import torch

    dtype = str(lm.model.dtype).removeprefix("torch.")
    label = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {lm.device} {dtype}"
    if lm.device.type == "cuda":
        label += f" ({torch.cuda.get_device_name(lm.device)})"
    return label


def model_settings_of(args: argparse.Namespace) -> ModelSettings:
    """The bench's own model: the one the services load (``--model``, ``--dtype``)."""
    return ModelSettings(name=args.model, dtype=args.dtype)


def service_env_of(parser: argparse.ArgumentParser, args: argparse.Namespace, model: ModelSettings) -> dict[str, str]:
    """The services' environment for this run: the demo's CPU settings where the model runs on a
    CPU, the model's dtype where one is asked for, then ``--service-env``."""
    try:
        extra = parse_env(args.service_env)
    except ValueError as exc:
        parser.error(f"--service-env: {exc}")
    dtype = {"SEAL_MODEL__DTYPE": model.dtype} if model.dtype != "auto" else {}
    return service_defaults(model.device, {**dtype, **extra})
