"""Trainer app: subscriptions through FastStream's in-memory broker, and the keep-alive."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from faststream.nats import JStream, TestNatsBroker
from test_trainer_handlers import DIRECTIVES, SEQUENCES, FakeLedger, FakeRegistry, FakeStore

from services.trainer.app import create_app, heartbeat_interval
from services.trainer.handlers import TrainerPorts
from services.trainer.lora_training import LoraTrainer
from services.trainer.ports import ParentCache
from services.trainer.settings import TrainerConfig, TrainerSettings
from shared import events as ev
from shared.settings import ModelSettings
from shared.subjects import (
    ADAPTER_TRAINED,
    EVENTS_STREAM,
    POLICY_TRAINED,
    POLICY_TRAINING_REQUESTED,
    SELFEDIT_GENERATED,
    TRAINER_SELFEDITS,
)


@pytest.fixture
def app_and_ports(tiny_model, tmp_path: Path):
    store = FakeStore()
    ports = TrainerPorts(
        trainer=LoraTrainer(tiny_model, tmp_path),
        store=store,
        registry=FakeRegistry(),
        ledger=FakeLedger(),
        parents=ParentCache(store, tmp_path / "parents"),
    )
    settings = TrainerSettings(model=ModelSettings(name="tiny"), _secrets_dir=str(tmp_path / "none"))
    return create_app(settings, ports), ports


async def test_a_self_edit_on_the_bus_becomes_adapter_trained(app_and_ports) -> None:
    app, ports = app_and_ports
    broker = app.broker
    trained: asyncio.Queue[ev.AdapterTrained] = asyncio.Queue()

    @broker.subscriber(ADAPTER_TRAINED, stream=JStream(EVENTS_STREAM, declare=False))
    async def collect(event: ev.AdapterTrained) -> None:
        await trained.put(event)

    edit = ev.SelfEdit(self_edit_id="se-1", format="rewrite", completion="x", sequences=SEQUENCES, directives=DIRECTIVES)
    sent = ev.SelfEditGenerated(feedback_id="fb-1", scope="acme", self_edit=edit)
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(sent.model_dump(mode="json"), SELFEDIT_GENERATED)
        out = await asyncio.wait_for(trained.get(), 60)
    assert out.self_edit_id == "se-1" and out.causation_id == sent.event_id
    assert ports.store.exists(out.adapter.uri)


async def test_a_policy_request_on_the_bus_becomes_policy_trained(app_and_ports) -> None:
    app, ports = app_and_ports
    got: asyncio.Queue[ev.PolicyAdapterTrained] = asyncio.Queue()

    @app.broker.subscriber(POLICY_TRAINED, stream=JStream(EVENTS_STREAM, declare=False))
    async def collect(event: ev.PolicyAdapterTrained) -> None:
        await got.put(event)

    request = ev.PolicyTrainingRequested(
        feedback_id="fb-2", scope="acme", directives=DIRECTIVES,
        examples=(ev.PolicyExample(prompt="Rewrite: a fact.", completion="A fact, rewritten."),),
    )
    async with TestNatsBroker(app.broker) as test_broker:
        await test_broker.publish(request.model_dump(mode="json"), POLICY_TRAINING_REQUESTED)
        out = await asyncio.wait_for(got.get(), 60)
    assert out.round == 1 and ports.store.exists(out.adapter.uri)


async def test_an_invalid_self_edit_is_rejected_without_training(app_and_ports) -> None:
    app, ports = app_and_ports
    async with TestNatsBroker(app.broker) as test_broker:
        await test_broker.publish({"type": "selfedit.generated", "scope": "acme", "feedback_id": "f"}, SELFEDIT_GENERATED)
    assert ports.store.objects == {}


def test_consumer_overrides_keep_the_shared_subject() -> None:
    config = TrainerConfig(ack_wait_s=6, max_deliver=3, consumer_group="canary")
    spec = config.self_edits
    assert spec.subject == TRAINER_SELFEDITS.subject
    assert spec.durable == "trainer-selfedits-canary"
    assert spec.ack_wait == timedelta(seconds=6) and spec.max_deliver == 3
    assert heartbeat_interval(spec) == pytest.approx(2.0)
    assert TrainerConfig().self_edits == TRAINER_SELFEDITS


def test_a_parent_cache_too_small_for_the_jobs_in_flight_is_refused_at_start() -> None:
    # a self-edit, a rebase and a policy request may each hold a parent while another is fetched
    from pydantic import ValidationError

    from services.trainer.settings import TrainerConfig

    with pytest.raises(ValidationError, match="parent_cache_size"):
        TrainerConfig(parent_cache_size=1)
    assert TrainerConfig(parent_cache_size=4).parent_cache_size == 4
