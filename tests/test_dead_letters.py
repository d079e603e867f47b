"""The dead-letter middleware alone: what is rejected at once, what is retried, and what is
never terminated without a stored copy."""

from __future__ import annotations

import nats
import pytest
from bus_support import dead_letter_middleware, jetstream_message

from shared.dead_letters import REASON_HEADER, PermanentFailure


@pytest.mark.servers
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


def test_a_body_nested_too_deep_names_no_feedback() -> None:
    """The trace middleware reads a body's feedback id before anything validates it: JSON nested
    past Python's recursion limit is no feedback id, not a crash outside the dead-letter path."""
    from shared.telemetry import lineage_of

    assert lineage_of(b"[" * 3000) is None
    assert lineage_of(b'{"feedback_id": "fb-1", "scope": "acme"}') == ("fb-1", "acme")
    assert lineage_of(b'{"feedback_id": "fb-1", "scope": 7}') == ("fb-1", "")


def test_the_same_feedback_id_in_two_scopes_has_two_traces() -> None:
    """Products choose their feedback ids: "fb-1" of acme and "fb-1" of globex are two feedbacks,
    each in a trace of its own (and sampled on its own)."""
    from shared.telemetry import feedback_root, root_traceparent

    assert feedback_root("fb-1", "acme")[0] != feedback_root("fb-1", "globex")[0]
    assert feedback_root("fb-1", "acme") == feedback_root("fb-1", "acme")
    assert root_traceparent("fb-1", "acme").split("-")[1] == feedback_root("fb-1", "acme")[0]


async def test_a_body_nested_too_deep_to_decode_is_dead_lettered_at_once() -> None:
    """FastStream's JSON decoding raises RecursionError on a body nested thousands deep, before any
    handler runs: no retry can read it, so it is dead-lettered with a reason, not retried."""
    import json as stdlib_json

    from faststream.exceptions import RejectMessage

    from shared.subjects import GENERATOR_FEEDBACK

    stored: list[dict] = []

    class Broker:
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str, timeout: float | None = None) -> None:
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
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str, timeout: float | None = None) -> None:
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


# The log lines of a retry and of a dead-lettering: which feedback, event and dead letter they are about.


def _event_body(feedback_id: str = "fb-logs-1", event_id: str = "ev-logs-1") -> bytes:
    import json as stdlib_json

    return stdlib_json.dumps({"type": "feedback.submitted", "event_id": event_id, "feedback_id": feedback_id,
                              "scope": "acme"}).encode()


class AckingBroker:
    """Stores a dead-letter copy and acknowledges it as JetStream does, with its sequence in the stream."""

    def __init__(self, sequence: int = 7) -> None:
        self.sequence = sequence
        self.stored: list[tuple[str, dict]] = []

    async def publish(self, body: bytes, subject: str, headers: dict, stream: str, timeout: float | None = None) -> object:
        from nats.js.api import PubAck

        self.stored.append((subject, headers))
        return PubAck(stream=stream, seq=self.sequence)


def _records(caplog: pytest.LogCaptureFixture, event_id: str) -> list:
    return [r for r in caplog.records if r.name == "shared.dead_letters" and event_id in r.getMessage()]


async def test_a_transient_failure_is_logged_with_its_message_and_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The retry's line names the subject, event, feedback and stream sequence; the handler's exception
    comes with its traceback (the NackMessage it becomes carries neither to FastStream's own log)."""
    import logging

    from faststream.exceptions import NackMessage

    from shared.subjects import GENERATOR_FEEDBACK

    async def flaky(_: object) -> None:
        raise ConnectionError("object store unreachable")

    msg = jetstream_message(2, GENERATOR_FEEDBACK.durable, body=_event_body(), sequence=1234)
    with caplog.at_level(logging.WARNING, logger="shared.dead_letters"), pytest.raises(NackMessage):
        await dead_letter_middleware("generator", msg, AckingBroker()).consume_scope(flaky, msg)
    [record] = _records(caplog, "ev-logs-1")
    line = record.getMessage()
    assert "transient failure (delivery 2 of 5)" in line and "\n" not in line
    for part in ("subject=seal.events.feedback.submitted", "type=feedback.submitted", "event_id=ev-logs-1",
                 "feedback_id=fb-logs-1", "stream_seq=SEAL_EVENTS:1234", "ConnectionError: object store unreachable"):
        assert part in line
    assert record.exc_info and isinstance(record.exc_info[1], ConnectionError)
    assert "in flaky" in caplog.text  # the traceback, down to the handler's frame
    assert (record.feedback_id, record.event_id, record.stream_seq) == ("fb-logs-1", "ev-logs-1", 1234)


@pytest.mark.parametrize(
    ("delivered", "failure", "headline"),
    [
        (5, ConnectionError("object store unreachable"), "giving up after 5 deliveries on message"),
        (1, PermanentFailure("malformed feedback: no passage"), "rejecting message"),
    ],
)
async def test_a_dead_lettering_is_logged_with_its_dead_letter_sequence(
    delivered: int, failure: Exception, headline: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Given up on (its last delivery) or rejected at once: one line names the message and the dead letter
    its copy became, by the sequence JetStream acknowledged (what ``seal replay`` takes), with the traceback."""
    import logging

    from faststream.exceptions import RejectMessage

    from shared.subjects import GENERATOR_FEEDBACK

    async def failing(_: object) -> None:
        raise failure

    broker = AckingBroker(sequence=31)
    msg = jetstream_message(delivered, GENERATOR_FEEDBACK.durable, body=_event_body(), sequence=99)
    with caplog.at_level(logging.WARNING, logger="shared.dead_letters"), pytest.raises(RejectMessage):
        await dead_letter_middleware("generator", msg, broker).consume_scope(failing, msg)
    assert len(broker.stored) == 1
    [record] = _records(caplog, "ev-logs-1")
    line = record.getMessage()
    assert line.startswith(headline) and "\n" not in line
    for part in ("event_id=ev-logs-1", "feedback_id=fb-logs-1", "stream_seq=SEAL_EVENTS:99", str(failure),
                 "dead letter 31 (stream SEAL_DLQ, subject seal.dlq.generator.seal.events.feedback.submitted)"):
        assert part in line
    assert record.dead_letter_seq == 31 and record.feedback_id == "fb-logs-1"
    assert record.exc_info and record.exc_info[1] is failure


async def test_a_body_that_is_no_event_is_still_logged_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """What a hostile body holds is quoted, not written into the log as lines of its own; with no event
    id in it, the message id the producer gave names it."""
    import logging

    from faststream.exceptions import RejectMessage

    from shared.subjects import GENERATOR_FEEDBACK

    async def rejecting(_: object) -> None:
        raise PermanentFailure("no")

    body = b'{"feedback_id": "fb\\nFAKE ERROR line", "type": 3}'
    msg = jetstream_message(1, GENERATOR_FEEDBACK.durable, body=body)
    with caplog.at_level(logging.WARNING, logger="shared.dead_letters"), pytest.raises(RejectMessage):
        await dead_letter_middleware("generator", msg, AckingBroker()).consume_scope(rejecting, msg)
    [record] = [r for r in caplog.records if r.name == "shared.dead_letters"]
    line = record.getMessage()
    assert "\n" not in line and "feedback_id='fb\\nFAKE ERROR line'" in line
    assert "event_id=x" in line and "type=" not in line


async def test_a_copy_from_the_max_deliveries_advisory_is_logged_with_its_dead_letter_sequence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    from types import SimpleNamespace

    from shared.dead_letters import _copy_exhausted

    original = SimpleNamespace(data=_event_body("fb-adv", "ev-adv"), subject="seal.events.feedback.submitted",
                               headers={"Nats-Msg-Id": "ev-adv"})

    class Stream:
        async def get_msg(self, stream: str, sequence: int) -> object:
            return original

    broker = AckingBroker(sequence=12)
    broker.config = SimpleNamespace(connection_state=SimpleNamespace(stream=Stream()))  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="shared.dead_letters"):
        await _copy_exhausted(broker, "SEAL_EVENTS", "generator-feedback", 77, 5)  # type: ignore[arg-type]
    [record] = _records(caplog, "ev-adv")
    line = record.getMessage()
    for part in ("feedback_id=fb-adv", "stream_seq=SEAL_EVENTS:77", "dead letter 12 (stream SEAL_DLQ"):
        assert part in line
    assert record.dead_letter_seq == 12


@pytest.mark.servers
async def test_a_message_dead_lettered_through_a_real_server_is_logged_with_its_sequences(
    provisioned_stack, caplog: pytest.LogCaptureFixture,
) -> None:
    """Through nats-server: the give-up line names the event, its feedback, its sequence in the events
    stream and the sequence its copy has in the dead-letter stream, and carries the handler's traceback."""
    import asyncio
    import contextlib
    import json as stdlib_json
    import logging

    from shared import events as ev
    from shared.broker import create_broker, durable_subscriber, publish_event
    from shared.subjects import DLQ_PREFIX, DLQ_STREAM, EVENTS_STREAM, FEEDBACK_SUBMITTED, ConsumerSpec

    lost = ev.FeedbackSubmitted(feedback_id=ev.new_id(), scope="acme",
                                content=ev.KnowledgeFeedback(passage="a passage whose store never answers"))
    service = "dlqlogs"
    spec = ConsumerSpec(f"{service}-{ev.new_id()[:8]}", FEEDBACK_SUBMITTED, max_deliver=2, backoff=(0.1,))
    broker = create_broker(provisioned_stack.nats_settings(), service=service)

    @durable_subscriber(broker, spec)
    async def on_feedback(event: ev.FeedbackSubmitted) -> None:
        if event.feedback_id == lost.feedback_id:
            raise ConnectionError("object store unreachable")

    nc = await nats.connect(provisioned_stack.nats_url)
    js = nc.jetstream()
    dead = await nc.subscribe(f"{DLQ_PREFIX}.{service}.>")
    try:
        with caplog.at_level(logging.WARNING, logger="shared.dead_letters"):
            async with broker:
                await broker.start()
                await publish_event(broker, lost)
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    assert asyncio.get_running_loop().time() < deadline, "no dead-letter copy"
                    with contextlib.suppress(nats.errors.TimeoutError):
                        copy = await dead.next_msg(timeout=1)
                        if lost.feedback_id.encode() in (copy.data or b""):  # another test's letter may be no JSON
                            break
                stored = await js.get_last_msg(DLQ_STREAM, copy.subject)
                original = await js.get_last_msg(EVENTS_STREAM, FEEDBACK_SUBMITTED)
                # JetStream's max-deliveries notice for the same message (its terminate lost, say) stores no second copy
                from shared.dead_letters import _copy_exhausted

                await _copy_exhausted(broker, EVENTS_STREAM, spec.durable, original.seq, 2)
                assert (await js.get_last_msg(DLQ_STREAM, copy.subject)).seq == stored.seq
                for _ in range(150):  # the line is logged once the copy is acknowledged
                    if any(r.levelno == logging.ERROR for r in _records(caplog, lost.event_id)):
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("no dead-lettering line logged within 15 s")
    finally:
        await nc.close()
    assert stdlib_json.loads(original.data)["event_id"] == lost.event_id
    retry, gave_up, *_ = _records(caplog, lost.event_id)  # then the notice's line, for the same copy
    assert retry.getMessage().startswith("transient failure (delivery 1 of 2)")
    line = gave_up.getMessage()
    assert line.startswith("giving up after 2 deliveries on message")
    for part in (f"event_id={lost.event_id}", f"feedback_id={lost.feedback_id}", "type=feedback.submitted",
                 f"stream_seq={EVENTS_STREAM}:{original.seq}", f"dead letter {stored.seq} (stream {DLQ_STREAM},"):
        assert part in line
    assert gave_up.dead_letter_seq == stored.seq
    assert gave_up.exc_info and isinstance(gave_up.exc_info[1], ConnectionError)


def test_a_service_log_line_names_the_feedback_and_trace_it_was_logged_in() -> None:
    """shared.runtime's log lines: one logged while a feedback is worked on says which (the baggage
    mark_lineage sets) and in which trace; one logged outside any is as before; a traceback is kept."""
    import io
    import logging

    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from shared.runtime import log_handler
    from shared.telemetry import feedback_context, feedback_root, mark_lineage

    out = io.StringIO()
    logger = logging.getLogger("tests.lineage")
    logger.addHandler(log_handler(out))
    logger.propagate, logger.level = False, logging.INFO
    try:
        logger.info("outside any feedback")
        token = otel_context.attach(feedback_context("fb-line"))
        try:
            with trace.get_tracer("tests").start_as_current_span("work"):
                lineage = mark_lineage("fb-line", "acme")
                try:
                    try:
                        raise ConnectionError("object store unreachable")
                    except ConnectionError:
                        logger.exception("could not store")
                finally:
                    otel_context.detach(lineage)
        finally:
            otel_context.detach(token)
        logger.warning("given up", extra={"feedback_id": "fb-own"})
    finally:
        logger.handlers.clear()
    first, second, *rest = out.getvalue().splitlines()
    assert first.endswith(" INFO tests.lineage: outside any feedback")
    trace_id = feedback_root("fb-line")[0]
    assert f"ERROR tests.lineage [feedback=fb-line trace={trace_id}]: could not store" in second
    assert "ConnectionError: object store unreachable" in rest[-2] and "Traceback" in rest[0]
    assert rest[-1].endswith(" WARNING tests.lineage [feedback=fb-own]: given up")
