"""A service told to stop ends its long work at once and hands the message back (shared.shutdown).

Generation (the generator's self-edits, the evaluator's closed-book answers, the
trainer's rehearsal answers) ends at its next token once the stop flag is set;
on real NATS a stopped generator's feedback goes to another replica at once,
not after the consumer's ack wait, and is written exactly once; on its last
delivery an interrupted message is dead-lettered, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import nats
import pytest
from bus_support import dead_letter_middleware, jetstream_message
from faststream.exceptions import NackMessage, RejectMessage
from test_generator_service import candidate_count

from services.evaluator.adapters import AdapterSlot
from services.evaluator.app import build_ports
from services.evaluator.app import create_app as create_evaluator
from services.evaluator.measurement import Measurer, ScoreCache
from services.evaluator.settings import EvaluatorConfig, EvaluatorSettings
from services.generator.app import create_app
from services.generator.handlers import GeneratorPorts
from services.generator.prompts import Prompt
from services.generator.settings import GeneratorConfig, GeneratorSettings
from services.generator.state import KvLedger, KvScopeState
from services.generator.writer import SelfEditWriter, Written
from services.trainer.rehearsal import Rehearsal
from shared import events as ev
from shared.broker import publish_event
from shared.dead_letters import REASON_HEADER
from shared.generation import chat_prompt, generate
from shared.models import LoadedModel
from shared.registry_view import PolicyAdapterRef
from shared.shutdown import Interrupted
from shared.subjects import DLQ_PREFIX, DLQ_STREAM, GENERATOR_FEEDBACK, dead_letter_subject

PASSAGE = (
    "Quellmoor is a market town on the eastern bank of the Sallow Brenn. It received its market charter "
    "in 1387 from Duke Aldric Venmoor. The local grammar school was founded by the merchant Ottilie Brask."
)


class SetAfter(threading.Event):
    """A stop flag that reads as set from its ``after``-th look on (a stop that lands mid-generation)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.after or super().is_set()


def test_generation_ends_at_the_next_token_once_the_flag_is_set(tiny_model: LoadedModel) -> None:
    prompts = [chat_prompt(tiny_model, "Tell me about Quellmoor."), chat_prompt(tiny_model, "Name a river.")]
    flag = SetAfter(6)  # the look before the first batch, then one per generated token
    with pytest.raises(Interrupted, match="generation stopped with 0 of 2 prompts answered"):
        generate(tiny_model, prompts, max_new_tokens=200, batch_size=1, stop=flag)
    assert flag.looks <= 8  # it stopped a token after the flag, not 200 tokens later
    # unset, the same flag costs nothing: all of both answers
    assert len(generate(tiny_model, prompts, max_new_tokens=4, batch_size=1, stop=threading.Event())) == 2


def test_a_stopped_measurer_measures_nothing_and_remembers_nothing(tiny_model: LoadedModel) -> None:
    measurer = Measurer(AdapterSlot(tiny_model), ScoreCache(), max_new_tokens=8, batch_size=4)
    probes = [ev.Probe(question="Who founded the grammar school of Quellmoor?", answer="Ottilie Brask")]
    measurer.stop()
    with pytest.raises(Interrupted):
        measurer.measure("base:tiny", lambda: None, {"target": probes})
    assert measurer.cache.get("base:tiny", measurer.digest(probes)) is None
    assert measurer.questions_asked == 0


def test_rehearsal_answers_interrupted_are_not_kept(tiny_model: LoadedModel) -> None:
    rehearsal = Rehearsal(("Say hello.", "Name a colour."), count=2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        rehearsal.sample(tiny_model, seed=0, stop=stop)
    assert not rehearsal._answers  # nothing half-generated is kept for later jobs


class GatedWriter(SelfEditWriter):
    """The real writer, held inside ``write`` for feedback carrying ``marker`` until it is stopped."""

    def __init__(self, lm: LoadedModel, config: GeneratorConfig, marker: str):
        super().__init__(lm, config)
        self.marker = marker
        self.entered = threading.Event()
        self.raised: list[BaseException] = []

    def write(self, prompts: Sequence[Prompt], *, seed: int, adapter: PolicyAdapterRef | None = None) -> Written:
        if any(self.marker in p.text for p in prompts):
            self.entered.set()
            self.stopping.wait(60)
        try:
            return super().write(prompts, seed=seed, adapter=adapter)
        except BaseException as exc:
            self.raised.append(exc)
            raise


@pytest.mark.servers
async def test_a_stopped_generator_hands_its_feedback_to_another_replica_at_once(
    service_settings, tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = GeneratorConfig(max_new_tokens=16, adapter_cache_dir=tmp_path / "adapters")
    settings = GeneratorSettings(
        nats=service_settings.nats, store=service_settings.store, model=service_settings.model, generator=config,
        _secrets_dir=str(tmp_path / "no-secrets"),
    )
    marker = f"ferry number {int(ev.new_id()[:6], 16)}"
    feedback = ev.FeedbackSubmitted(
        feedback_id=ev.new_id(), scope="shutdown",
        content=ev.KnowledgeFeedback(passage=f"{PASSAGE} Its {marker} crosses the river.", title="Quellmoor"),
    )
    nc = await nats.connect(service_settings.nats.url)
    js = nc.jetstream()
    written: asyncio.Queue[dict] = asyncio.Queue()
    dead: list[dict] = []

    async def collect(msg) -> None:  # noqa: ANN001
        body = json.loads(msg.data)
        if body.get("feedback_id") == feedback.feedback_id:
            await written.put(body)

    async def collect_dead(msg) -> None:  # noqa: ANN001
        if marker in msg.data.decode(errors="replace"):
            dead.append(json.loads(msg.data))

    await nc.subscribe("seal.events.selfedit.>", cb=collect)
    await nc.subscribe(f"{DLQ_PREFIX}.>", cb=collect_dead)

    def replica(writer: SelfEditWriter):  # noqa: ANN202
        ports = GeneratorPorts(KvScopeState(js), KvLedger(js), writer, publish=None)  # type: ignore[arg-type]
        app = create_app(settings, ports)
        ports.publish = lambda event: publish_event(app.broker, event)  # type: ignore[method-assign]
        return app

    stopped = GatedWriter(tiny_model, config, marker)
    first, second = replica(stopped), replica(SelfEditWriter(tiny_model, config))
    try:
        await first.start()
        await publish_event(first.broker, feedback)
        assert await asyncio.to_thread(stopped.entered.wait, 60), "the first replica never took the feedback"
        await second.start()
        with caplog.at_level(logging.WARNING, logger="shared.dead_letters"):
            signalled = time.monotonic()
            await first.stop()
        out = [await asyncio.wait_for(written.get(), 60)]
        handed_over = time.monotonic() - signalled
        while len(out) < candidate_count(out[0]):
            out.append(await asyncio.wait_for(written.get(), 60))
        entry = await KvLedger(js).recall(feedback.scope, feedback.feedback_id)
        for _ in range(100):  # the ledger says done just after the events are out
            if entry is not None and entry.status == "done":
                break
            await asyncio.sleep(0.1)
            entry = await KvLedger(js).recall(feedback.scope, feedback.feedback_id)
    finally:
        await first.stop()
        await second.stop()
        await nc.close()
    assert [type(e) for e in stopped.raised] == [Interrupted]
    assert "handed back for redelivery: the generator is shutting down (generation stopped" in caplog.text
    # redelivered at once, not after the consumer's ack wait
    assert handed_over < GENERATOR_FEEDBACK.ack_wait.total_seconds() / 4
    assert written.empty() and entry is not None and entry.status == "done" and len(entry.event_ids) == len(out)
    assert not dead


@pytest.mark.servers
async def test_a_stopped_evaluator_stops_measuring(service_settings, tiny_model: LoadedModel, tmp_path: Path) -> None:
    core = tmp_path / "core.jsonl"
    core.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n')
    settings = EvaluatorSettings(
        nats=service_settings.nats, store=service_settings.store, model=service_settings.model,
        evaluator=EvaluatorConfig(core_set_path=core, core_filter="never", work_dir=tmp_path / "w", max_new_tokens=8),
        _secrets_dir=str(tmp_path / "no-secrets"),
    )
    ports = build_ports(settings, lm=tiny_model, adapters=None, registry=None)  # type: ignore[arg-type]
    app = create_evaluator(settings, ports)
    await app.start()
    assert not ports.measurer.stopping.is_set()
    await app.stop()
    with pytest.raises(Interrupted):
        ports.measurer.measure("base:tiny", lambda: None, {"core": ports.core_set})


class RecordingBroker:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []

    async def publish(self, body: bytes, subject: str, headers: dict, stream: str | None = None, timeout: float | None = None) -> None:
        assert stream == DLQ_STREAM  # stored with JetStream's acknowledgement, not fired and forgotten
        self.published.append((subject, headers))


@pytest.mark.parametrize("delivered", [1, 4, 5])
async def test_an_interrupted_message_is_handed_back_or_on_its_last_delivery_dead_lettered(delivered: int) -> None:
    subject = "seal.events.feedback.submitted"
    msg = jetstream_message(delivered, GENERATOR_FEEDBACK.durable, subject=subject)
    broker = RecordingBroker()
    middleware = dead_letter_middleware("generator", msg, broker)

    async def stopped(_: object) -> None:
        raise Interrupted("generation stopped with 0 of 3 prompts answered")

    if delivered < GENERATOR_FEEDBACK.max_deliver:
        with pytest.raises(NackMessage):
            await middleware.consume_scope(stopped, msg)
        assert broker.published == []
    else:  # JetStream would not deliver it again: kept in the dead letters, with why
        with pytest.raises(RejectMessage):
            await middleware.consume_scope(stopped, msg)
        [(where, headers)] = broker.published
        assert where == dead_letter_subject("generator", subject)
        assert headers[REASON_HEADER].startswith("interrupted by a shutdown on its last delivery (5 of 5)")


@pytest.mark.servers
async def test_a_service_closes_what_its_handlers_use_only_once_they_are_done(service_settings) -> None:
    # The generator and the trainer closed their own NATS connection among the first shutdown hooks,
    # before the broker drained their handler: its claim release and record failed on the way out.
    from shared.broker import create_broker
    from shared.runtime import service_app

    broker = create_broker(service_settings.nats, service="shutdown-order")
    subject = f"seal.test.shutdown.{ev.new_id()[:8]}"
    order: list[str] = []
    entered, may_finish = asyncio.Event(), asyncio.Event()

    @broker.subscriber(subject)
    async def handle(body: object) -> None:
        entered.set()
        await may_finish.wait()
        order.append("handler done")

    async def tell_to_stop() -> None:
        order.append("told to stop")
        may_finish.set()

    async def close() -> None:
        order.append("closed")

    app = service_app(broker, on_shutdown=[tell_to_stop], after_shutdown=[close])
    await app.start()
    try:
        await broker.publish(b"work", subject)
        await asyncio.wait_for(entered.wait(), 10)
    finally:
        await app.stop()
    assert order == ["told to stop", "handler done", "closed"]
