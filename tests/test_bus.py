"""The bus through a real nats-server: trace context, dedup, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats
import pytest
from bus_support import dead_letter_middleware, jetstream_message
from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import events as ev
from shared.broker import create_broker, durable_subscriber, kept_in_progress, publish_event
from shared.dead_letters import REASON_HEADER, PermanentFailure
from shared.settings import TelemetrySettings
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
        await asyncio.sleep(0.3)
    beats = msg.beats
    await asyncio.sleep(0.15)
    assert beats >= 3
    assert msg.beats == beats  # no beats once the work is done


async def test_the_beat_stops_even_when_a_publish_swallows_the_cancellation() -> None:
    msg = BeatingMessage(swallow_cancel=True)

    async def work() -> None:
        async with kept_in_progress(msg, every_s=0.01):
            await asyncio.sleep(0.05)  # leaves the beat inside in_progress

    await asyncio.wait_for(work(), timeout=5)
    beats = msg.beats
    await asyncio.sleep(0.1)
    assert msg.beats == beats


async def test_a_stored_record_that_does_not_parse_is_a_transient_failure_not_a_bad_payload(provisioned_stack) -> None:
    """A registry record written by a newer registry (or damaged) must not dead-letter every event of its
    scope at once as an 'invalid payload': the handler fails transiently, and the reason names the record."""
    from faststream.exceptions import NackMessage

    from shared.registry_view import UnreadableRecord, read_scope_policy
    from shared.subjects import KV_SCOPE_SETTINGS, TRAINER_SELFEDITS

    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        js = nc.jetstream()
        await (await js.key_value(KV_SCOPE_SETTINGS)).put("unreadable", b'{"candidates": 3, "approval": "by-committee"}')
        with pytest.raises(UnreadableRecord, match="the record 'unreadable' in .* does not parse .*approval") as info:
            await read_scope_policy(js, "unreadable")
    finally:
        await nc.close()

    async def handler(_: object) -> None:
        raise info.value

    msg = jetstream_message(1, TRAINER_SELFEDITS.durable, subject="seal.events.selfedit.generated")
    with pytest.raises(NackMessage):  # retried with backoff, not rejected
        await dead_letter_middleware("trainer", msg).consume_scope(handler, msg)


@pytest.mark.parametrize("delivered", [1, 5])
async def test_without_a_stored_dead_letter_copy_the_message_is_not_terminated(delivered: int, caplog, monkeypatch) -> None:
    """The dead-letter stream unreachable: a rejected message goes back to its stream for a later try
    (not terminated with no copy anywhere); on its last delivery the log says where it still is."""
    from faststream.exceptions import NackMessage, RejectMessage

    from shared import dead_letters as bus
    from shared.subjects import GENERATOR_FEEDBACK

    class Unreachable:
        def __init__(self) -> None:
            self.tries = 0

        async def publish(self, *args: object, **kwargs: object) -> None:
            self.tries += 1
            raise TimeoutError("nats: timeout")

    monkeypatch.setattr(bus, "DEAD_LETTER_BACKOFF_S", 0.0)
    msg = jetstream_message(delivered, GENERATOR_FEEDBACK.durable)
    broker = Unreachable()
    middleware = dead_letter_middleware("generator", msg, broker)

    async def hostile(_: object) -> None:
        raise PermanentFailure("malformed feedback: no passage")

    if delivered == 1:
        with pytest.raises(NackMessage) as nacked:
            await middleware.consume_scope(hostile, msg)
        assert nacked.value.extra_options == {"delay": bus.DEAD_LETTER_RETRY_S}
    else:
        with pytest.raises(RejectMessage):
            await middleware.consume_scope(hostile, msg)
        assert "still in its stream (stream SEAL_EVENTS, sequence 42)" in caplog.text
    assert broker.tries == bus.DEAD_LETTER_TRIES


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


async def test_a_message_never_answered_lands_in_the_dead_letters(provisioned_stack) -> None:
    """Every delivery outran the ack wait (a pod OOM-killed each time): no exception anywhere, only
    JetStream's advisory; the registry's subscriber copies the message to the dead letters with why."""
    from datetime import timedelta

    from nats.js.api import ConsumerConfig, DeliverPolicy

    from shared.dead_letters import SERVICE_HEADER, dead_letter_exhausted_deliveries
    from shared.subjects import DLQ_STREAM, EVENTS_STREAM

    nc = await nats.connect(provisioned_stack.nats_url)
    js = nc.jetstream()
    dead = await nc.subscribe(f"{DLQ_PREFIX}.crashy.>")
    watcher = create_broker(provisioned_stack.nats_settings(), service="registry")
    dead_letter_exhausted_deliveries(watcher)
    durable = f"crashy-{ev.new_id()[:8]}"
    lost = feedback("a passage whose handler always dies")
    try:
        async with watcher:
            await watcher.start()
            sub = await js.pull_subscribe(
                FEEDBACK_SUBMITTED, durable=durable, stream=EVENTS_STREAM,
                config=ConsumerConfig(ack_wait=timedelta(seconds=1).total_seconds(), max_deliver=2, deliver_policy=DeliverPolicy.NEW),
            )
            await publish_event(watcher, lost)
            lost_trace = {"id": None}
            seen = 0
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:  # take it, never answer (as a dying pod)
                with contextlib.suppress(nats.errors.TimeoutError):
                    for msg in await sub.fetch(1, timeout=1.5):
                        if json.loads(msg.data).get("feedback_id") == lost.feedback_id:
                            seen += 1
                            lost_trace["id"] = (msg.headers or {}).get("traceparent", "--").split("-")[1]
                with contextlib.suppress(nats.errors.TimeoutError):
                    copy = await dead.next_msg(timeout=0.1)
                    if json.loads(copy.data).get("feedback_id") == lost.feedback_id:
                        break
            else:
                pytest.fail("no dead-letter copy of a message whose deliveries ran out")
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
    assert copy.headers["traceparent"].split("-")[1] == feedback_root(lost.feedback_id)[0]


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
    assert seen == {"generator": feedback_root(sent.feedback_id)[0], "registry": feedback_root(sent.feedback_id)[0]}


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
    assert "could not bring the durable consumers" in caplog.text


def test_a_body_nested_too_deep_names_no_feedback() -> None:
    """The trace middleware reads a body's feedback id before anything validates it: JSON nested
    past Python's recursion limit is no feedback id, not a crash outside the dead-letter path."""
    from shared.telemetry import feedback_id_of

    assert feedback_id_of(b"[" * 3000) is None
    assert feedback_id_of(b'{"feedback_id": "fb-1"}') == "fb-1"


async def test_a_body_nested_too_deep_to_decode_is_dead_lettered_at_once() -> None:
    """FastStream's JSON decoding raises RecursionError on a body nested thousands deep, before any
    handler runs: no retry can read it, so it is dead-lettered with a reason, not retried."""
    import json as stdlib_json

    from faststream.exceptions import RejectMessage

    from shared.subjects import GENERATOR_FEEDBACK

    stored: list[dict] = []

    class Broker:
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str) -> None:
            stored.append(headers)

    async def decoding(_: object) -> None:
        stdlib_json.loads(b"[" * 100_000)

    msg = jetstream_message(1, GENERATOR_FEEDBACK.durable)
    with pytest.raises(RejectMessage):
        await dead_letter_middleware("generator", msg, Broker()).consume_scope(decoding, msg)
    assert stored and stored[0][REASON_HEADER] == "invalid payload: nested too deeply to read"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"feedback_id": "fb-1", "scope": ', "Expecting value"),
        (b'{"feedback_id": "fb-1", "n": ' + b"9" * 5000 + b"}", "integer string conversion"),
        (b'{"a": "\xc3\x28"}', "can't decode byte"),
    ],
)
async def test_a_body_that_is_no_json_is_dead_lettered_at_once(body: bytes, why: str) -> None:
    """FastStream decodes the body before the handler runs; its error (a syntax error, an integer of
    thousands of digits, bytes that are no UTF-8) is a plain ValueError, which looked transient: five
    deliveries, then "failed 5 times". No retry reads such a body: it is dead-lettered at once."""
    import json as stdlib_json

    from faststream.exceptions import RejectMessage

    from shared.subjects import GENERATOR_FEEDBACK

    stored: list[dict] = []

    class Broker:
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str) -> None:
            stored.append(headers)

    async def decoding(message: object) -> None:
        stdlib_json.loads(message.body)  # type: ignore[attr-defined]

    msg = jetstream_message(1, GENERATOR_FEEDBACK.durable, body=body)
    with pytest.raises(RejectMessage):
        await dead_letter_middleware("generator", msg, Broker()).consume_scope(decoding, msg)
    assert stored and stored[0][REASON_HEADER].startswith("invalid payload: not readable as JSON (")
    assert why in stored[0][REASON_HEADER]


async def test_a_readable_body_with_a_failing_handler_is_still_retried() -> None:
    from faststream.exceptions import NackMessage

    from shared.subjects import GENERATOR_FEEDBACK

    async def failing(_: object) -> None:
        raise ValueError("the S3 server said no")

    msg = jetstream_message(1, GENERATOR_FEEDBACK.durable, body=b'{"feedback_id": "fb-1"}')
    with pytest.raises(NackMessage):
        await dead_letter_middleware("generator", msg).consume_scope(failing, msg)


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
        async def publish(self, body: object, subject: str, headers: dict, stream: str) -> None:
            seen.append(baggage.get_baggage(FEEDBACK_ID))

    await publish_event(Broker(), ev.FeedbackRejected(feedback_id="fb-left", scope="acme", reason="no"))  # type: ignore[arg-type]
    assert seen == ["fb-left"]
    assert baggage.get_baggage(FEEDBACK_ID) is None
