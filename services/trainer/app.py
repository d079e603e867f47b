"""Wiring: the broker, three durable consumers, the ports, the base model.

``create_app(settings)`` builds the real ports in the startup hook (the base
model loads there, once per process); tests pass ``ports`` with fakes. Each
subscriber only keeps its message alive while the handler runs and publishes
what the handler returns.

Every replica shares the same durable pull consumers, so each message is
trained by one trainer. Training outlasts the consumer's ``ack_wait``, so
while a handler runs the message gets an in-progress acknowledgement every
``ack_wait / 3`` seconds; a trainer that dies stops sending them, and
JetStream redelivers the message to another replica after ``ack_wait``.

A trainer told to stop (SIGTERM: a rolling update, a node drained) does not
train on to the end, which can take longer than the pod's grace period: its
training ends before the next optimizer step, the message goes back to
JetStream at once (a negative acknowledgement, so another replica takes it
without waiting for ``ack_wait``), and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faststream.asgi import AsgiFastStream
from faststream.nats.annotations import NatsMessage
from opentelemetry.sdk.trace import TracerProvider

from services.trainer import handlers
from services.trainer.handlers import TrainerPorts
from services.trainer.settings import TrainerSettings
from shared.broker import create_broker, durable_subscriber, kept_in_progress, publish_event
from shared.connections import connect_nats
from shared.events import Event, PolicyTrainingRequested, RebaseRequested, SelfEditGenerated
from shared.runtime import service_app
from shared.subjects import ConsumerSpec
from shared.telemetry import FEEDBACK_ID, SCOPE, setup_tracing

log = logging.getLogger(__name__)



def heartbeat_interval(spec: ConsumerSpec) -> float:
    return max(spec.ack_wait.total_seconds() / 3, 0.1)


def create_app(
    settings: TrainerSettings,
    ports: TrainerPorts | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
) -> AsgiFastStream:
    provider = tracer_provider or setup_tracing(settings.telemetry, settings.service_name)
    tracer = provider.get_tracer("seal.trainer")
    broker = create_broker(settings.nats, service=settings.service_name, tracer_provider=provider)
    config = settings.trainer
    state: dict[str, Any] = {"ports": ports, "nc": None}

    async def run(event: Event, msg: Any, spec: ConsumerSpec, handler: Any) -> None:
        delivery = _delivery(msg)
        log.info("training for %s %s (scope %s, delivery %s)", event.type, event.event_id, event.scope, delivery)
        attributes = {FEEDBACK_ID: event.feedback_id, SCOPE: event.scope, "seal.event_id": event.event_id,
                      "messaging.delivery": str(delivery)}
        with tracer.start_as_current_span("trainer.train", attributes=attributes):
            # A training stopped by shutdown raises Interrupted: the middleware hands the message back.
            async with kept_in_progress(msg, heartbeat_interval(spec), settings.work_limit_s):
                produced = await handler(event, state["ports"])
            for out in produced:
                await publish_event(broker, out)

    @durable_subscriber(broker, config.self_edits)
    async def on_self_edit(event: SelfEditGenerated, msg: NatsMessage) -> None:
        await run(event, msg, config.self_edits, handlers.train_self_edit)

    @durable_subscriber(broker, config.rebases)
    async def on_rebase(event: RebaseRequested, msg: NatsMessage) -> None:
        await run(event, msg, config.rebases, handlers.train_self_edit)

    @durable_subscriber(broker, config.policy)
    async def on_policy_request(event: PolicyTrainingRequested, msg: NatsMessage) -> None:
        await run(event, msg, config.policy, handlers.train_policy)

    async def start() -> None:
        if state["ports"] is None:
            state["nc"] = await connect_nats(settings.nats)
            state["ports"] = await asyncio.to_thread(build_ports, settings, state["nc"].jetstream())

    async def stop() -> None:
        # Before the broker drains its handlers: a training in progress ends at its next step.
        stop_training = getattr(state["ports"] and state["ports"].trainer, "stop", None)
        if stop_training is not None:
            stop_training()

    async def close() -> None:
        # After the drain: a handler on its way out still releases its upload claim over this connection.
        if state["nc"] is not None:
            await state["nc"].close()

    return service_app(
        broker, ready=lambda: state["ports"] is not None, on_startup=[start], on_shutdown=[stop], after_shutdown=[close],
        connections=lambda: (state["nc"],),
    )


def build_ports(settings: TrainerSettings, js: Any) -> TrainerPorts:
    """The real adapters: object store, registry KV, ledger, and the base model (loaded here, once)."""
    from services.trainer.lora_training import Anchoring, Layout, LoraTrainer
    from services.trainer.ports import KvParentLedger, KvRegistryReader, ParentCache, StoredAdapters
    from services.trainer.rehearsal import Rehearsal
    from shared.models import load_model
    from shared.store import AdapterStore

    config = settings.trainer
    store = StoredAdapters(AdapterStore.from_settings(settings.store))
    store.store.ensure_bucket()
    lm = load_model(settings.model)
    layout = Layout(row_tokens=config.row_tokens, pass_tokens=config.pass_tokens, step_pause_s=config.step_pause_s)
    return TrainerPorts(
        trainer=LoraTrainer(
            lm,
            config.work_dir,
            layout,
            Rehearsal.from_file(config.rehearsal_prompts, config.rehearsal_pairs),
            Anchoring(weight=config.rehearsal_weight, batch=config.rehearsal_batch),
        ),
        store=store,
        registry=KvRegistryReader(js),
        ledger=KvParentLedger(js),
        parents=ParentCache(store, config.work_dir / "parents", config.parent_cache_size),
        replay_per_epoch=config.replay_per_epoch,
        lineage_limit=config.lineage_limit,
    )


def _delivery(msg: Any) -> int | str:
    try:
        return int(msg.raw_message.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - the in-memory test broker has no JetStream metadata
        return "?"
