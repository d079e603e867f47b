"""The bus through a real nats-server: trace context, dedup, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats
import nats.js.errors
import pytest
from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import events as ev
from shared.broker import create_broker, durable_subscriber, kept_in_progress, publish_event
from shared.dead_letters import REASON_HEADER, PermanentFailure
from shared.settings import NatsSettings, TelemetrySettings
from shared.subjects import DLQ_PREFIX, FEEDBACK_SUBMITTED, ConsumerSpec
from shared.telemetry import FEEDBACK_ID, setup_tracing

pytestmark = pytest.mark.servers


def feedback(passage: str = "Quellmoor received its charter in 1387.") -> ev.FeedbackSubmitted:
    return ev.FeedbackSubmitted(
        feedback_id=ev.new_id(), scope="acme", content=ev.KnowledgeFeedback(passage=passage)
    )


async def next_dead_letter(nc: nats.NATS, sub: object, timeout: float = 20) -> nats.aio.msg.Msg:
    return await sub.next_msg(timeout=timeout)  # type: ignore[attr-defined]


async def test_trace_context_survives_the_hop(provisioned_stack) -> None:
    exporter = InMemorySpanExporter()
    provider = setup_tracing(TelemetrySettings(), "test", [SimpleSpanProcessor(exporter)])
    spec = ConsumerSpec("test-trace", FEEDBACK_SUBMITTED)
    broker = create_broker(provisioned_stack.nats_settings(), service="test", tracer_provider=provider)
    # The durable consumer starts at the stream's beginning: feedback other tests published in
    # this session comes first, so the handler keeps only this test's event, with the trace id
    # it ran under.
    received: asyncio.Queue[tuple[ev.FeedbackSubmitted, int]] = asyncio.Queue()
    sent = feedback()

    @durable_subscriber(broker, spec)
    async def on_feedback(event: ev.FeedbackSubmitted) -> None:
        if event.event_id == sent.event_id:
            await received.put((event, trace.get_current_span().get_span_context().trace_id))

    async with broker:
        await broker.start()
        await publish_event(broker, sent)
        got, handler_trace_id = await asyncio.wait_for(received.get(), 20)
    provider.force_flush()
    assert got == sent
    spans = exporter.get_finished_spans()
    publish = [s for s in spans if s.kind.name == "PRODUCER"]
    assert publish, [s.name for s in spans]
    assert len({s.context.trace_id for s in publish}) == 1  # this test's one message ("create", "publish")
    trace_id = publish[0].context.trace_id
    assert handler_trace_id == trace_id
    process = [s for s in spans if s.kind.name == "CONSUMER" and s.context.trace_id == trace_id]
    assert process, [s.name for s in spans]
    assert process[0].parent is not None and process[0].parent.trace_id == trace_id


async def test_duplicate_event_ids_are_dropped(provisioned_stack) -> None:
    broker = create_broker(provisioned_stack.nats_settings(), service="test")
    spec = ConsumerSpec("test-dedup", FEEDBACK_SUBMITTED)
    seen: list[str] = []
    done = asyncio.Event()
    sent, other = feedback("first"), feedback("second")

    @durable_subscriber(broker, spec)
    async def on_feedback(event: ev.FeedbackSubmitted) -> None:
        if event.feedback_id in (sent.feedback_id, other.feedback_id):
            seen.append(event.feedback_id)
        if event.feedback_id == other.feedback_id:
            done.set()

    async with broker:
        await broker.start()
        await publish_event(broker, sent)
        await publish_event(broker, sent)  # redelivered producer: same event id
        await publish_event(broker, other)
        await asyncio.wait_for(done.wait(), 20)
    assert seen == [sent.feedback_id, other.feedback_id]


async def test_bad_payload_is_dead_lettered_and_others_still_flow(provisioned_stack) -> None:
    nc = await nats.connect(provisioned_stack.nats_url)
    dead = await nc.subscribe(f"{DLQ_PREFIX}.test.>")
    broker = create_broker(provisioned_stack.nats_settings(), service="test")
    spec = ConsumerSpec("test-dlq", FEEDBACK_SUBMITTED, max_deliver=3, backoff=(0.1,))
    good = feedback("a good passage")
    fine = asyncio.Event()
    attempts: dict[str, int] = {}

    @durable_subscriber(broker, spec)
    async def on_feedback(event: ev.FeedbackSubmitted) -> None:
        text = event.content.passage  # type: ignore[union-attr]
        attempts[text] = attempts.get(text, 0) + 1
        if text == "explode":
            raise PermanentFailure("the passage asks for something we never do")
        if text == "flaky":
            raise ConnectionError("object store unreachable")
        if event.feedback_id == good.feedback_id:
            fine.set()

    try:
        async with broker:
            await broker.start()
            js = nc.jetstream()
            await js.publish(FEEDBACK_SUBMITTED, b'{"type": "feedback.submitted", "scope": "../etc"}')
            await publish_event(broker, feedback("explode"))
            await publish_event(broker, feedback("flaky"))
            await publish_event(broker, good)
            await asyncio.wait_for(fine.wait(), 20)
            reasons = {}
            for _ in range(3):
                msg = await next_dead_letter(nc, dead)
                body = json.loads(msg.data) if msg.data.startswith(b"{") else {}
                key = body.get("content", {}).get("passage", "malformed")
                reasons[key] = msg.headers[REASON_HEADER]
    finally:
        await nc.close()
    assert "scope" in reasons["malformed"] and "pattern" in reasons["malformed"]
    assert reasons["explode"] == "the passage asks for something we never do"
    assert "failed 3 times" in reasons["flaky"] and "object store unreachable" in reasons["flaky"]
    assert attempts["explode"] == 1  # permanent: never redelivered
    assert attempts["flaky"] == 3  # transient: bounded by max_deliver


def test_lineage_attribute_name_is_stable() -> None:
    assert FEEDBACK_ID == "seal.feedback_id"
    assert isinstance(NatsBroker, type)


class BeatingMessage:
    """Counts in-progress acks; optionally swallows a cancellation like nats-py's publish does."""

    def __init__(self, swallow_cancel: bool = False) -> None:
        self.beats = 0
        self.swallow_cancel = swallow_cancel

    async def in_progress(self) -> None:
        self.beats += 1
        if self.swallow_cancel:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.2)


async def test_long_work_keeps_its_message_in_progress_and_stops_after() -> None:
    msg = BeatingMessage()
    async with kept_in_progress(msg, every_s=0.05):
        for _ in range(100):  # at least 3 beats, however slow the loop
            if msg.beats >= 3:
                break
            await asyncio.sleep(0.05)
    beats = msg.beats
    await asyncio.sleep(0.15)
    assert beats >= 3
    assert msg.beats == beats  # no beats once the work is done


async def test_work_past_its_limit_lets_its_message_go_and_the_service_reports_itself_hung(caplog) -> None:
    """A handler that hangs (a worker thread that never returns) no longer holds its message for
    ever: the beat stops, so JetStream redelivers it elsewhere, and until the work ends the process
    counts as not alive, so Kubernetes restarts it."""
    from shared.broker import overdue_work

    msg = BeatingMessage()
    msg.body = b'{"type": "selfedit.generated", "event_id": "ev-hung", "feedback_id": "fb-hung"}'  # type: ignore[attr-defined]
    async with kept_in_progress(msg, every_s=0.02, at_most_s=0.1):
        await asyncio.sleep(0.3)
        assert msg.beats <= 6  # about 0.1 s of beats, then none
        beats = msg.beats
        await asyncio.sleep(0.1)
        assert msg.beats == beats
        [hung] = overdue_work
        assert "event_id=ev-hung" in hung and "feedback_id=fb-hung" in hung
    assert not overdue_work  # the work ended: alive again
    assert "still working on" in caplog.text and "fb-hung" in caplog.text and "ended after" in caplog.text
    async with kept_in_progress(msg, every_s=0.02, at_most_s=5):
        await asyncio.sleep(0.1)
    assert not overdue_work and caplog.text.count("still working on") == 1  # within its limit: nothing said


async def test_work_that_waited_its_turn_counts_its_limit_from_when_it_began() -> None:
    """The trainer trains one job at a time: a message that waited for the training before it is
    not hung; its limit counts from when its own training began (said from the worker thread)."""
    from shared.broker import overdue_work, work_begins

    msg = BeatingMessage()
    async with kept_in_progress(msg, every_s=0.05, at_most_s=3.0):
        await asyncio.sleep(2.0)  # waiting for the lock
        await asyncio.to_thread(work_begins)  # as the trainer's worker thread does once it has it
        await asyncio.sleep(2.0)  # 4 s in all, 2 s of its own work
        assert not overdue_work
        beats = msg.beats
        await asyncio.sleep(0.3)
        assert msg.beats > beats  # still beating past 3 s since the message came: it is held
    work_begins()  # outside any message's work: nothing happens


async def test_liveness_fails_while_work_is_hung() -> None:
    import httpx

    from shared.broker import overdue_work
    from shared.runtime import service_app

    app = service_app(create_broker(NatsSettings(url="nats://127.0.0.1:1"), service="test"))
    overdue_work.add("message [subject=seal.events.selfedit.generated event_id=ev-1]")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
            hung = await http.get("/healthz")
    finally:
        overdue_work.clear()
    assert hung.status_code == 500 and "hung: message [subject=seal.events.selfedit.generated" in hung.text


async def test_the_beat_stops_even_when_a_publish_swallows_the_cancellation() -> None:
    msg = BeatingMessage(swallow_cancel=True)

    async def work() -> None:
        async with kept_in_progress(msg, every_s=0.01):
            await asyncio.sleep(0.05)  # leaves the beat inside in_progress

    await asyncio.wait_for(work(), timeout=5)
    beats = msg.beats
    await asyncio.sleep(0.1)
    assert msg.beats == beats


async def test_an_existing_consumer_takes_the_ack_wait_and_limit_it_is_given_now(provisioned_stack) -> None:
    """A durable consumer keeps the settings it was created with; the service brings it to its spec."""
    from datetime import timedelta

    from shared.broker import reconcile_consumers

    durable = f"test-reconcile-{ev.new_id()[:8]}"

    async def subscribed(spec: ConsumerSpec, reconcile: bool) -> tuple[float, int]:
        broker = create_broker(provisioned_stack.nats_settings(), service="test")

        @durable_subscriber(broker, spec)
        async def on_feedback(event: ev.FeedbackSubmitted) -> None:
            pass

        async with broker:
            await broker.start()
            if reconcile:
                await reconcile_consumers(broker)
            info = await broker.config.connection_state.stream.consumer_info(spec.stream, durable)
        return info.config.ack_wait, info.config.max_deliver

    first = ConsumerSpec(durable, FEEDBACK_SUBMITTED, max_deliver=5, ack_wait=timedelta(seconds=60))
    raised = ConsumerSpec(durable, FEEDBACK_SUBMITTED, max_deliver=8, ack_wait=timedelta(seconds=180))
    assert await subscribed(first, reconcile=False) == (60, 5)
    assert await subscribed(raised, reconcile=False) == (60, 5)  # what JetStream does on its own
    assert await subscribed(raised, reconcile=True) == (180, 8)
    assert await subscribed(raised, reconcile=True) == (180, 8)  # nothing left to change


async def test_a_message_never_answered_lands_in_the_dead_letters_even_with_no_registry_listening(provisioned_stack) -> None:
    """Every delivery outran the ack wait (a pod OOM-killed each time): no exception anywhere, only
    JetStream's advisory, published once. It is kept in its stream, so a registry that starts only
    afterwards (all its pods were down) still copies the message to the dead letters, with why."""
    from datetime import timedelta

    from nats.js.api import ConsumerConfig, DeliverPolicy

    from shared.dead_letters import SERVICE_HEADER, dead_letter_exhausted_deliveries
    from shared.subjects import ADVISORIES_STREAM, DLQ_STREAM, EVENTS_STREAM, MAX_DELIVERIES_ADVISORY

    nc = await nats.connect(provisioned_stack.nats_url)
    js = nc.jetstream()
    dead = await nc.subscribe(f"{DLQ_PREFIX}.crashy.>")
    publisher = create_broker(provisioned_stack.nats_settings(), service="test")
    durable = f"crashy-{ev.new_id()[:8]}"
    advisory_subject = MAX_DELIVERIES_ADVISORY.replace("*", durable)
    lost = feedback("a passage whose handler always dies")
    try:
        async with publisher:
            await publisher.start()
            sub = await js.pull_subscribe(
                FEEDBACK_SUBMITTED, durable=durable, stream=EVENTS_STREAM,
                config=ConsumerConfig(ack_wait=timedelta(seconds=1).total_seconds(), max_deliver=2, deliver_policy=DeliverPolicy.NEW),
            )
            await publish_event(publisher, lost)
            lost_trace = {"id": None}
            seen = 0
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:  # take it, never answer (as a dying pod)
                with contextlib.suppress(nats.errors.TimeoutError):
                    for msg in await sub.fetch(1, timeout=1.5):
                        if json.loads(msg.data).get("feedback_id") == lost.feedback_id:
                            seen += 1
                            lost_trace["id"] = (msg.headers or {}).get("traceparent", "--").split("-")[1]
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.get_last_msg(ADVISORIES_STREAM, advisory_subject)
                    break  # JetStream gave up on it, while nobody listened
            else:
                pytest.fail("no max-deliveries advisory kept for a message whose deliveries ran out")

        watcher = create_broker(provisioned_stack.nats_settings(), service="registry")
        dead_letter_exhausted_deliveries(watcher)
        async with watcher:
            await watcher.start()
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:
                with contextlib.suppress(nats.errors.TimeoutError):
                    copy = await dead.next_msg(timeout=0.5)
                    if json.loads(copy.data).get("feedback_id") == lost.feedback_id:
                        break
            else:
                pytest.fail("no dead-letter copy of a message whose deliveries ran out before a registry listened")
            stored = await js.get_last_msg(DLQ_STREAM, copy.subject)  # kept in the stream, not just sent
    finally:
        await nc.close()
    assert seen == 2
    assert copy.subject == f"{DLQ_PREFIX}.crashy.{FEEDBACK_SUBMITTED}"
    assert copy.headers[SERVICE_HEADER] == "crashy"
    assert copy.headers[REASON_HEADER].startswith(f"no answer after 2 deliveries to consumer {durable}")
    assert json.loads(stored.data)["feedback_id"] == lost.feedback_id
    # still in the trace of the message it copies (here sent with none: the feedback's own root),
    # not the advisory's
    from shared.telemetry import feedback_root

    assert lost_trace["id"] == ""
    assert copy.headers["traceparent"].split("-")[1] == feedback_root(lost.feedback_id, lost.scope)[0]


async def test_feedback_published_without_trace_context_is_one_trace_for_every_consumer(provisioned_stack) -> None:
    """A product publishing on the bus itself sends no traceparent: the generator and the registry
    (and any redelivery) must still land in one trace, the feedback's own."""
    from shared.telemetry import current_trace_id, feedback_root

    provider = setup_tracing(TelemetrySettings(), "test", [SimpleSpanProcessor(InMemorySpanExporter())])
    sent = feedback()
    got: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

    def consumer(name: str):  # noqa: ANN202
        broker = create_broker(provisioned_stack.nats_settings(), service=name, tracer_provider=provider)

        @durable_subscriber(broker, ConsumerSpec(f"test-root-{name}-{ev.new_id()[:6]}", FEEDBACK_SUBMITTED))
        async def on_feedback(event: ev.FeedbackSubmitted) -> None:
            if event.feedback_id == sent.feedback_id:
                await got.put((name, current_trace_id()))

        return broker

    brokers = [consumer("generator"), consumer("registry")]
    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for broker in brokers:
                await stack.enter_async_context(broker)
                await broker.start()
            await nc.jetstream().publish(FEEDBACK_SUBMITTED, sent.model_dump_json().encode())  # no headers at all
            seen = dict([await asyncio.wait_for(got.get(), 20), await asyncio.wait_for(got.get(), 20)])
    finally:
        await nc.close()
    root = feedback_root(sent.feedback_id, sent.scope)[0]
    assert seen == {"generator": root, "registry": root}


async def test_a_consumer_that_cannot_be_reconciled_does_not_stop_the_service(caplog) -> None:
    """Bringing consumers to their spec is best effort: a failing server call is logged, not raised
    (the generator, trainer, evaluator and registry all start through it)."""
    from types import SimpleNamespace

    from shared.broker import _BROKER_SPECS, reconcile_consumers

    class Unreachable:
        async def consumer_info(self, stream: str, durable: str) -> None:
            raise TimeoutError("nats: timeout")

    class Broker:  # what reconcile_consumers reads of a NatsBroker
        config = SimpleNamespace(connection_state=SimpleNamespace(stream=Unreachable()))

    broker = Broker()
    _BROKER_SPECS[broker] = [ConsumerSpec("test-unreachable", FEEDBACK_SUBMITTED)]
    assert await reconcile_consumers(broker) == []
    assert "could not bring consumer test-unreachable" in caplog.text


async def test_a_consumer_made_for_another_subject_is_brought_to_its_own_and_one_failure_stops_no_other() -> None:
    """A durable keeps the subject it was made with (an event renamed since): its handler would
    silently receive nothing. One consumer that cannot be reconciled leaves the next ones to be."""
    from types import SimpleNamespace

    from nats.js.api import ConsumerConfig

    from shared.broker import _BROKER_SPECS, reconcile_consumers

    made: list[ConsumerConfig] = []

    class Server:
        async def consumer_info(self, stream: str, durable: str) -> SimpleNamespace:
            if durable == "test-broken":
                raise TimeoutError("nats: timeout")
            return SimpleNamespace(config=ConsumerConfig(
                durable_name=durable, filter_subject="seal.events.feedback.old_name", ack_wait=60.0, max_deliver=5))

        async def add_consumer(self, stream: str, config: ConsumerConfig) -> None:
            made.append(config)

    class Broker:
        config = SimpleNamespace(connection_state=SimpleNamespace(stream=Server()))

    broker = Broker()
    _BROKER_SPECS[broker] = [ConsumerSpec("test-broken", FEEDBACK_SUBMITTED), ConsumerSpec("test-renamed", FEEDBACK_SUBMITTED)]
    changed = await reconcile_consumers(broker)
    assert [c.filter_subject for c in made] == [FEEDBACK_SUBMITTED] and made[0].durable_name == "test-renamed"
    assert len(changed) == 1 and "subject seal.events.feedback.old_name -> " in changed[0]


async def test_liveness_answers_while_the_broker_is_connected(provisioned_stack) -> None:
    import httpx

    from shared.runtime import service_app

    broker = create_broker(provisioned_stack.nats_settings(), service="test")
    app = service_app(broker)
    async with broker:
        await broker.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
            alive = await http.get("/healthz")
    assert alive.status_code == 204


async def test_publishing_an_event_leaves_no_baggage_behind() -> None:
    """The event's feedback goes out in the publish's baggage and is not left in the caller's
    context, where the registry's sweep carried it into unrelated later work."""
    from opentelemetry import baggage

    from shared.broker import publish_event
    from shared.telemetry import FEEDBACK_ID

    seen: list[object] = []

    class Broker:
        async def publish(self, body: object, subject: str, headers: dict, stream: str, timeout: float | None = None) -> None:
            seen.append(baggage.get_baggage(FEEDBACK_ID))
            seen.append(headers.get("baggage"))
            seen.append(timeout)

    await publish_event(Broker(), ev.FeedbackRejected(feedback_id="fb-left", scope="acme", reason="no"))  # type: ignore[arg-type]
    # in the message too, from outside any consumer (an HTTP handler, a sweep): the next service reads it
    assert seen[0] == "fb-left" and "seal.feedback_id=fb-left" in seen[1] and "seal.scope=acme" in seen[1]
    # JetStream's acknowledgement waited for in seconds, not FastStream's half second
    assert seen[2] == 5.0
    assert baggage.get_baggage(FEEDBACK_ID) is None


def test_the_sample_ratio_applies_to_feedback_traces_and_every_service_decides_alike() -> None:
    """Every feedback's trace arrives as a sampled parent, so the ratio used to apply to nothing:
    at 0.2, every feedback was still exported. The trace id decides, the same in every service."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared.telemetry import feedback_context

    def kept(ratio: float, service: str) -> set[str]:
        exporter = InMemorySpanExporter()
        provider = setup_tracing(TelemetrySettings(sample_ratio=ratio), service, [SimpleSpanProcessor(exporter)])
        tracer = provider.get_tracer("test")
        for i in range(200):
            with tracer.start_as_current_span("handle", context=feedback_context(f"fb-{i}")):
                pass
        return {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()}

    assert len(kept(1.0, "generator")) == 200 and kept(0.0, "generator") == set()
    some = kept(0.2, "generator")
    assert 15 <= len(some) <= 70  # about 40 of 200
    assert kept(0.2, "trainer") == some  # the same feedbacks in another service


def test_an_exporter_address_is_logged_without_its_credentials(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from shared.telemetry import without_credentials

    assert without_credentials("https://tenant:s3cr3t@otlp.example:4318/v1/traces") == "https://***@otlp.example:4318/v1/traces"
    assert without_credentials("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    with caplog.at_level(logging.INFO, logger="shared.telemetry"):
        setup_tracing(TelemetrySettings(otlp_endpoint="http://token@127.0.0.1:9"), "test")
    assert "exporting traces to http://***@127.0.0.1:9/v1/traces" in caplog.text and "token" not in caplog.text
