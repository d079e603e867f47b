"""Wiring: broker, subscriber, KV state, object store, model.

``create_app(settings)`` builds the real adapters in the startup hook (the
base model loads there, once); tests pass ``ports`` and nothing heavy is
built. The subscriber only feeds raw messages to
:func:`~services.generator.handlers.handle_feedback`, keeping the message
alive with in-progress acks while the model writes.

A generator told to stop (SIGTERM) does not write on past the pod's grace
period: the writing ends at its next token, the feedback goes back to
JetStream at once for another replica, and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from faststream.asgi import AsgiFastStream
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NatsClient

from services.generator.handlers import GeneratorPorts, handle_feedback
from services.generator.settings import GeneratorSettings
from services.generator.state import KvLedger, KvScopeState
from services.generator.writer import SelfEditWriter
from shared.broker import (
    create_broker,
    durable_subscriber,
    ensure_streams,
    kept_in_progress,
    publish_event,
)
from shared.connections import connect_nats
from shared.events import Event
from shared.models import load_model
from shared.registry_view import PolicyAdapterRef
from shared.runtime import service_app
from shared.store import AdapterManifest, AdapterStore
from shared.subjects import GENERATOR_FEEDBACK
from shared.telemetry import setup_tracing

log = logging.getLogger(__name__)


class _Runtime:
    """What the startup hook builds and the subscriber uses."""

    def __init__(self, ports: GeneratorPorts | None):
        self.ports = ports
        self.nc: NatsClient | None = None
        self.store: AdapterStore | None = None

    def ready(self) -> bool:
        if self.ports is None:
            return False
        if self.nc is not None and not self.nc.is_connected:
            return False
        return True


def create_app(settings: GeneratorSettings, ports: GeneratorPorts | None = None) -> AsgiFastStream:
    provider = setup_tracing(settings.telemetry, settings.service_name)
    broker = create_broker(settings.nats, service=settings.service_name, tracer_provider=provider)
    runtime = _Runtime(ports)
    heartbeat_s = max(1.0, GENERATOR_FEEDBACK.ack_wait.total_seconds() / 3)

    @durable_subscriber(broker, GENERATOR_FEEDBACK)
    async def on_feedback(body: Any, message: NatsMessage) -> None:
        if runtime.ports is None:
            raise RuntimeError("the generator is not started yet")
        async with kept_in_progress(message, heartbeat_s, settings.work_limit_s):
            outcome = await handle_feedback(message.body, runtime.ports, settings.generator, _stream_sequence(message))
        log.info(
            "feedback %s: %d self-edits generated, %d rejected%s",
            outcome.feedback_id, outcome.generated, outcome.rejected, " (duplicate)" if outcome.duplicate else "",
        )

    async def publish(event: Event) -> None:
        await publish_event(broker, event)

    async def start() -> None:
        if runtime.ports is not None:
            return
        runtime.nc = await connect_nats(settings.nats)
        js = runtime.nc.jetstream()
        await ensure_streams(js, settings.nats)
        runtime.store = AdapterStore.from_settings(settings.store)
        lm = await asyncio.to_thread(load_model, settings.model)
        writer = SelfEditWriter(
            lm, settings.generator, fetch_adapter=_fetcher(runtime.store), cache_dir=settings.generator.adapter_cache_dir
        )
        runtime.ports = GeneratorPorts(KvScopeState(js), KvLedger(js), writer, publish)
        log.info("generator ready: model %s on %s", lm.name, lm.device)

    async def stop() -> None:
        # Before the broker drains its handler: writing in progress ends at its next token and the
        # feedback goes back to JetStream for another replica (shared.shutdown).
        stop_writing = getattr(runtime.ports and runtime.ports.writer, "stop", None)
        if stop_writing is not None:
            stop_writing()

    async def close() -> None:
        # After the drain: the handler on its way out still releases its claim and records its work
        # in KV over this connection (closed before, both failed and the claim waited out its 15 min).
        if runtime.nc is not None:
            await runtime.nc.close()

    return service_app(broker, ready=runtime.ready, on_startup=[start], on_shutdown=[stop], after_shutdown=[close],
                       connections=lambda: (runtime.nc,))


def _stream_sequence(message: NatsMessage) -> str | None:
    """The message's place in its stream: the same on every redelivery of it, another for the same
    feedback published again (None where the broker gives none, as its test double)."""
    try:
        return str(message.raw_message.metadata.sequence.stream)
    except Exception:  # noqa: BLE001 - not a JetStream message
        return None


def _fetcher(store: AdapterStore) -> Any:
    def fetch(ref: PolicyAdapterRef, folder: Path) -> AdapterManifest:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return store.get_adapter(ref.adapter, folder)

    return fetch

