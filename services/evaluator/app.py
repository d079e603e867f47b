"""Wiring: settings in, an ASGI app with the evaluator's subscriber out.

``create_app(settings, ports=None)``: the broker (tracing, dead letters), one
durable subscriber on ``adapter.trained``, ``/healthz`` and ``/readyz``. In
the startup hook, once, it loads the base model, builds the core-knowledge
set for that base and connects the object store and the registry's KV view;
tests pass ready-made :class:`EvaluatorPorts` (fakes, the tiny model) instead.

An evaluator told to stop (SIGTERM) does not measure on past the pod's grace
period: the measurement ends at its next token, the message goes back to
JetStream at once for another replica, and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from faststream.asgi import AsgiFastStream
from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.js import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider

from services.evaluator.adapters import AdapterSlot, AdapterSource
from services.evaluator.core_knowledge import (
    KeptQuestions,
    LayeredKeptQuestions,
    MemoryKeptQuestions,
    ObjectStoreKeptQuestions,
    core_set_for_base,
    load_question_set,
)
from services.evaluator.handlers import EvaluatorPorts, RegistryReader, evaluate_adapter
from services.evaluator.measurement import Measurer, ScoreCache, base_model_key
from services.evaluator.settings import EvaluatorSettings
from shared.broker import create_broker, durable_subscriber, kept_in_progress, publish_event
from shared.events import AdapterTrained, Probe
from shared.lora import base_bytes
from shared.models import LoadedModel, load_model
from shared.registry_view import AcceptedProbes, ScopePolicy, read_accepted_probes, read_scope_policy
from shared.runtime import service_app
from shared.scoring import ClosedBookResult
from shared.scratch import fresh_own_folder
from shared.store import AdapterStore
from shared.subjects import EVALUATOR_ADAPTERS
from shared.telemetry import setup_tracing

log = logging.getLogger(__name__)


class KvRegistryReader:
    """The registry's KV keys, read through the broker's own JetStream connection."""

    def __init__(self, js: Callable[[], JetStreamContext]):
        self._js = js

    async def accepted_probes(self, scope: str) -> AcceptedProbes:
        return await read_accepted_probes(self._js(), scope)

    async def scope_policy(self, scope: str) -> ScopePolicy:
        return await read_scope_policy(self._js(), scope)


def build_ports(
    settings: EvaluatorSettings,
    *,
    lm: LoadedModel,
    adapters: AdapterSource,
    registry: RegistryReader,
    kept: KeptQuestions | None = None,
) -> EvaluatorPorts:
    """Assemble the evaluator around a loaded base model (blocking: may score the core set)."""
    config = settings.evaluator
    judge, judge_identity = None, None
    if config.judge.enabled:
        from services.evaluator.judge import OpenAICompatibleJudge

        judge = OpenAICompatibleJudge(config.judge)
        judge_identity = judge.identity
    measurer = Measurer(
        AdapterSlot(lm),
        ScoreCache(config.score_cache_entries),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        judge=judge,
        judge_identity=judge_identity,
    )
    questions = load_question_set(config.core_set_path)
    base_key = base_model_key(lm.weights_sha256, lm.name)
    asked: list[ClosedBookResult] = []

    def score_base(probes: Sequence[Probe]) -> ClosedBookResult:
        asked.append(measurer.measure(base_key, lambda: None, {"core": probes})["core"])
        return asked[-1]

    core = core_set_for_base(
        questions,
        model_name=lm.name,
        mode=config.core_filter,
        cache_key=f"{lm.weights_sha256 or lm.name}-{measurer.digest(questions)[:16]}",
        kept=kept or MemoryKeptQuestions(),
        score_base=score_base,
    )
    if asked:
        # The base answered every kept question correctly just now: that is its core score.
        kept_items = {p.question for p in core}
        measurer.remember(base_key, core, ClosedBookResult(tuple(i for i in asked[0].items if i.question in kept_items)))
    log.info("core knowledge: %d of %d questions for base %s", len(core), len(questions), lm.name)
    # A folder per process: what a process killed mid-evaluation left (a downloaded adapter, a
    # merged copy) is removed as the next one starts, instead of filling the pod's /tmp volume.
    work_dir = fresh_own_folder((config.work_dir or Path(tempfile.gettempdir()) / "seal-evaluator").expanduser())
    return EvaluatorPorts(
        adapters=adapters,
        registry=registry,
        measurer=measurer,
        core_set=core,
        base_sha256=lm.weights_sha256,
        model_name=lm.name,
        work_dir=work_dir,
        product_weight=config.product_weight,
        max_adapter_bytes=base_bytes(lm.model),
    )



class Runtime:
    """What the app holds: the ports once built."""

    def __init__(self, settings: EvaluatorSettings, broker: NatsBroker, ports: EvaluatorPorts | None):
        self.settings = settings
        self.broker = broker
        self.ports = ports

    def require(self) -> EvaluatorPorts:
        if self.ports is None:
            raise RuntimeError("the evaluator has not finished starting")
        return self.ports

    def ready(self) -> bool:
        return self.ports is not None and self.ports.measurer.host.healthy

    def alive(self) -> bool:
        """False once the base model is left with an adapter it could not take off: every
        measurement would then be wrong, so the process must be restarted (liveness)."""
        return self.ports is None or self.ports.measurer.host.healthy

    async def stop(self) -> None:
        """Before the broker drains its handler: a measurement in progress ends at its next token and
        the adapter's event goes back to JetStream for another replica (shared.shutdown)."""
        if self.ports is not None:
            self.ports.measurer.stop()

    async def start(self) -> None:
        if self.ports is None:
            self.ports = await asyncio.to_thread(self._build)

    def _build(self) -> EvaluatorPorts:
        settings = self.settings
        lm = load_model(settings.model)
        store = AdapterStore.from_settings(settings.store)
        kept: KeptQuestions = MemoryKeptQuestions()
        if settings.evaluator.persist_core_filter:
            kept = LayeredKeptQuestions(kept, ObjectStoreKeptQuestions(store.client, store.bucket))
        registry = KvRegistryReader(lambda: self.broker.config.connection_state.stream)
        return build_ports(settings, lm=lm, adapters=store, registry=registry, kept=kept)


def create_app(
    settings: EvaluatorSettings,
    ports: EvaluatorPorts | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
) -> AsgiFastStream:
    provider = tracer_provider or setup_tracing(settings.telemetry, settings.service_name)
    broker = create_broker(settings.nats, service="evaluator", tracer_provider=provider)
    runtime = Runtime(settings, broker, ports)
    heartbeat_s = max(1.0, EVALUATOR_ADAPTERS.ack_wait.total_seconds() / 3)

    @durable_subscriber(broker, EVALUATOR_ADAPTERS)
    async def on_adapter_trained(event: AdapterTrained, message: NatsMessage) -> None:
        async with kept_in_progress(message, heartbeat_s, settings.work_limit_s):
            events = await evaluate_adapter(event, runtime.require())
        for out in events:
            await publish_event(broker, out)

    app = service_app(broker, ready=runtime.ready, alive=runtime.alive, on_startup=[runtime.start], on_shutdown=[runtime.stop])
    app.state_runtime = runtime  # type: ignore[attr-defined] - for tests and operators' shells
    return app
