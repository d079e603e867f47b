"""Wiring: the FastStream broker (consumers, request-reply) inside a FastAPI app.

``create_app(settings, ports=None)`` builds everything; the app's lifespan
connects to NATS (KV for state, JetStream for events), starts the broker and
the sweep that decides feedback whose timeout passed. Tests pass
:class:`AppPorts` with an in-memory state and a fake manifest reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats
from fastapi import FastAPI
from faststream.nats import NatsBroker

from shared import events as ev
from shared.broker import (
    bus_trouble,
    create_broker,
    durable_subscriber,
    ensure_streams,
    publish_event,
    reconcile_consumers,
)
from shared.connections import connect_broker, connect_nats, connection_of
from shared.dead_letters import dead_letter_exhausted_deliveries
from shared.store import AdapterStore
from shared.subjects import (
    REGISTRY_EVALUATED,
    REGISTRY_EVALUATION_FAILED,
    REGISTRY_FEEDBACK,
    REGISTRY_FEEDBACK_REJECTED,
    REGISTRY_POLICY_TRAINED,
    REGISTRY_SELFEDIT_REJECTED,
    REGISTRY_SELFEDITS,
    REGISTRY_TRAINED,
    REGISTRY_TRAINING_FAILED,
)
from shared.telemetry import current_trace_id, setup_tracing

from . import handlers
from .api import build_api
from .auth import Tokens
from .kv import NatsState, State
from .ledger import Ledger
from .operations import Operations
from .ports import Manifests, Ports, StoreManifests
from .redrive import DeadLetters
from .rpc import register_rpc
from .settings import RegistrySettings

log = logging.getLogger(__name__)
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

@dataclass
class AppPorts:
    """Replacements for the real adapters (tests); what is None is built from settings."""

    state: State | None = None
    manifests: Manifests | None = None
    store: AdapterStore | None = None
    clock: Callable[[], datetime] | None = None


class Runtime:
    """What the app holds while it runs: the connection, the ledger, the sweep."""

    def __init__(self, settings: RegistrySettings, broker: NatsBroker, ports: AppPorts):
        self.settings = settings
        self.broker = broker
        self.ports = ports
        self._ledger: Ledger | None = None
        self._nc: nats.NATS | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.answerer: Any = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("the registry has not started")
        return self._ledger

    async def publish(self, event: ev.Event) -> None:
        await publish_event(self.broker, event)

    async def attach(self) -> Ledger:
        """Build the ledger over the configured state (connecting to NATS KV if needed)."""
        state = self.ports.state
        if state is None:
            self._nc = await connect_nats(self.settings.nats)
            js = self._nc.jetstream()
            await ensure_streams(js, self.settings.nats)
            state = NatsState(js)
        store = self.ports.store
        if store is None and (self.ports.manifests is None or self.settings.registry.ask_enabled):
            store = AdapterStore.from_settings(self.settings.store)
        manifests = self.ports.manifests or StoreManifests(store)
        self._ledger = Ledger(
            Ports(
                state=state,
                publish=self.publish,
                manifests=manifests,
                clock=self.ports.clock or ev.utcnow,
                trace_id=current_trace_id,
            ),
            self.settings.registry,
        )
        if self.settings.registry.ask_enabled and store is not None:
            from .answering import ActiveModelAnswerer

            self.answerer = ActiveModelAnswerer(
                self.settings.model,
                store,
                self._ledger,
                self.settings.registry.adapter_cache_dir,
                self.settings.registry.ask_max_new_tokens,
                self.settings.registry.ask_max_waiting,
            )
        return self._ledger

    async def start(self) -> None:
        await connect_broker(self.broker)
        await self.attach()
        await self.broker.start()
        await reconcile_consumers(self.broker)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="registry-sweep")

    async def stop(self) -> None:
        # nats-py swallows a cancellation that lands inside a publish, so the
        # sweep also watches a flag: cancelling alone could leave it running.
        self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.broker.stop()
        if self._nc is not None:
            await self._nc.close()

    async def _sweep_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.ledger.sweep()
            except Exception:  # noqa: BLE001 - the sweep must outlive a bad pass
                log.exception("sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.registry.sweep_interval_s)

    async def trouble(self) -> str | None:
        """Why the registry is broken for good (for liveness), else None: its bus, as every
        service's (:func:`shared.broker.bus_trouble`)."""
        return await bus_trouble(self.broker, self._nc)

    async def ready(self) -> bool:
        connection = connection_of(self.broker)
        if self._ledger is None or connection is None or not connection.is_connected:
            return False
        return self._nc is None or self._nc.is_connected


def subscribe(broker: NatsBroker, runtime: Runtime) -> None:
    # Messages any service's consumer gave up on unanswered (crashes, timeouts) go to the dead letters.
    dead_letter_exhausted_deliveries(broker)

    @durable_subscriber(broker, REGISTRY_FEEDBACK)
    async def feedback_submitted(event: ev.FeedbackSubmitted) -> None:
        await handlers.on_feedback_submitted(event, runtime.ledger, current_trace_id())

    @durable_subscriber(broker, REGISTRY_FEEDBACK_REJECTED)
    async def feedback_rejected(event: ev.FeedbackRejected) -> None:
        await handlers.on_feedback_rejected(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_SELFEDITS)
    async def selfedit_generated(event: ev.SelfEditGenerated) -> None:
        await handlers.on_selfedit_generated(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_SELFEDIT_REJECTED)
    async def selfedit_rejected(event: ev.SelfEditRejected) -> None:
        await handlers.on_selfedit_rejected(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_TRAINED)
    async def adapter_trained(event: ev.AdapterTrained) -> None:
        await handlers.on_adapter_trained(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_TRAINING_FAILED)
    async def training_failed(event: ev.AdapterTrainingFailed) -> None:
        await handlers.on_pipeline_failure(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_EVALUATION_FAILED)
    async def evaluation_failed(event: ev.AdapterEvaluationFailed) -> None:
        await handlers.on_pipeline_failure(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_EVALUATED)
    async def adapter_evaluated(event: ev.AdapterEvaluated) -> None:
        await handlers.on_adapter_evaluated(event, runtime.ledger)

    @durable_subscriber(broker, REGISTRY_POLICY_TRAINED)
    async def policy_trained(event: ev.PolicyAdapterTrained) -> None:
        await handlers.on_policy_trained(event, runtime.ledger)


def create_app(settings: RegistrySettings, ports: AppPorts | None = None) -> FastAPI:
    provider = setup_tracing(settings.telemetry, "registry")
    broker = create_broker(settings.nats, service="registry", tracer_provider=provider)
    runtime = Runtime(settings, broker, ports or AppPorts())
    subscribe(broker, runtime)
    dead_letters = DeadLetters(lambda: broker.config.connection_state.stream, runtime.publish)
    ops = Operations(
        lambda: runtime.ledger, runtime.publish, answerer=lambda: runtime.answerer, dead_letters=lambda: dead_letters
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    tokens = Tokens(settings.registry.api_tokens)
    if tokens.enabled:
        log.info("registry API: %d token(s) (%s)", len(settings.registry.api_tokens),
                 ", ".join(f"{t.name}: {t.role}" for t in settings.registry.api_tokens))
    elif settings.http_host not in LOOPBACK_HOSTS:
        log.warning("registry API on %s:%d has no tokens (registry.api_tokens): whoever reaches it may "
                    "approve, roll back and change policies", settings.http_host, settings.http_port)
    register_rpc(broker, ops, tokens)  # the same tokens over NATS request-reply
    app = build_api(ops, runtime.trouble, runtime.ready, lifespan=lifespan, tokens=tokens)
    app.state.runtime = runtime
    app.state.broker = broker
    app.state.operations = ops
    return app
