"""What a dead-letter copy keeps of the original, and what is never dead-lettered: the server's own
headers and credentials stay out, a request over request-reply is answered instead of stored, and
a body no trace can be derived from still reaches the dead letters."""

from __future__ import annotations

import json
from email.header import Header
from types import SimpleNamespace

import pytest
from bus_support import dead_letter_middleware, jetstream_message
from faststream.exceptions import RejectMessage

from shared.dead_letters import REASON_HEADER, dead_letter_headers
from shared.subjects import GENERATOR_FEEDBACK, REGISTRY_RPC


def test_a_copy_keeps_the_originals_headers_as_text_but_not_the_servers_or_credentials() -> None:
    original = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Nats-Msg-Id": "ev-1",
        "Nats-Expected-Last-Sequence": "41",  # would make JetStream refuse the copy
        "Nats-Rollup": "sub",
        "Authorization": "Bearer p" + "p" * 31,
        "X-Product-Note": Header("caf\xe9", "utf-8"),  # how nats-py hands non-ASCII over from a stream read
    }
    headers = dead_letter_headers(original, "why", "generator")
    assert set(headers) == {"traceparent", "X-Product-Note", REASON_HEADER, "Seal-Dead-Letter-Service"}
    assert headers["X-Product-Note"] == "caf\xe9" and all(isinstance(v, str) for v in headers.values())


def test_a_feedback_id_that_is_no_utf8_names_no_trace_and_is_dead_lettered() -> None:
    from shared.telemetry import lineage_of

    assert lineage_of(b'{"feedback_id": "\\ud800", "scope": "acme"}') is None  # a lone surrogate: valid JSON
    assert lineage_of(b'{"feedback_id": "fb-1", "scope": "\\udfff"}') is None


async def test_a_request_that_cannot_be_read_is_answered_with_the_reason_and_never_stored() -> None:
    stored: list[dict] = []
    answers: list[bytes] = []

    class Broker:
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str, timeout: float | None = None) -> None:
            stored.append(headers)

    async def respond(data: bytes) -> None:
        answers.append(data)

    raw = SimpleNamespace(subject=f"{REGISTRY_RPC}.approve", headers={"Authorization": "Bearer " + "o" * 32},
                          reply="_INBOX.abc", respond=respond)
    msg = SimpleNamespace(body=b'{"operator": ', raw_message=raw)

    async def decoding(_: object) -> None:
        json.loads(msg.body)

    with pytest.raises(RejectMessage):
        await dead_letter_middleware("registry", msg, Broker()).consume_scope(decoding, msg)
    assert stored == []  # the caller's token never reaches the dead letters
    [answer] = answers
    assert json.loads(answer)["status"] == 400 and "Expecting value" in json.loads(answer)["error"]


async def test_a_stream_message_that_cannot_be_read_is_still_dead_lettered() -> None:
    stored: list[dict] = []

    class Broker:
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str, timeout: float | None = None) -> None:
            stored.append(headers)

    msg = jetstream_message(1, GENERATOR_FEEDBACK.durable, body=b'{"feedback_id": ')

    async def decoding(_: object) -> None:
        json.loads(msg.body)

    with pytest.raises(RejectMessage):
        await dead_letter_middleware("generator", msg, Broker()).consume_scope(decoding, msg)
    assert len(stored) == 1


@pytest.mark.parametrize("why", [
    "the product's payload is refused " + "because " * 50,  # over the limit with the reason alone
    "refused",  # under it by the copy's own headers, over it with those the publish adds (trace, content type)
])
async def test_a_copy_over_the_message_limit_keeps_the_reason_and_where_the_original_is(provisioned_stack, why: str) -> None:
    """An original near the server's limit, plus the reason, is over it: the server would close the
    service's connection for that publish (the client checks the body alone), and no copy was
    stored on any try. The copy keeps the reason and the original's position; the service stays up."""
    import asyncio

    import nats

    from shared import events as ev
    from shared.broker import create_broker, durable_subscriber
    from shared.dead_letters import TRUNCATED_HEADER, PermanentFailure
    from shared.subjects import DLQ_STREAM, FEEDBACK_SUBMITTED, ConsumerSpec, dead_letter_subject

    marker = ev.new_id()
    seen: asyncio.Queue[str] = asyncio.Queue()
    service = f"testbig{marker[:6]}"  # its own dead-letter subject: one run's copy is not another's
    broker = create_broker(provisioned_stack.nats_settings(), service=service)

    @durable_subscriber(broker, ConsumerSpec(f"testbig-{marker[:8]}", FEEDBACK_SUBMITTED, max_deliver=2))
    async def on_feedback(body: dict) -> None:
        if body.get("marker") == marker:
            raise PermanentFailure(why)
        if body.get("after") == marker:
            await seen.put("after")

    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        async with broker:
            await broker.start()
            js = nc.jetstream()
            limit = nc.max_payload
            big = json.dumps({"marker": marker, "filler": "x" * (limit - 300)}).encode()
            original = await js.publish(FEEDBACK_SUBMITTED, big)
            await js.publish(FEEDBACK_SUBMITTED, json.dumps({"after": marker}).encode())
            assert await asyncio.wait_for(seen.get(), 30) == "after"  # the service kept its connection
            subject = dead_letter_subject(service, FEEDBACK_SUBMITTED)
            for _ in range(100):
                try:
                    copy = await js.get_last_msg(DLQ_STREAM, subject)
                    break
                except nats.js.errors.NotFoundError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("no dead-letter copy stored")
            # Gone from the stream again: later tests' consumers would each meet it.
            await js.delete_msg(original.stream, original.seq)
    finally:
        await nc.close()
    assert copy.data in (b"", None)
    assert "over the server's message limit" in copy.headers[TRUNCATED_HEADER]
    assert "stays in stream SEAL_EVENTS at sequence" in copy.headers[TRUNCATED_HEADER]
    assert copy.headers[REASON_HEADER].startswith(why[:20])
