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
