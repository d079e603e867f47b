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
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str) -> None:
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
        async def publish(self, body: bytes, subject: str, headers: dict, stream: str) -> None:
            stored.append(headers)

    msg = jetstream_message(1, GENERATOR_FEEDBACK.durable, body=b'{"feedback_id": ')

    async def decoding(_: object) -> None:
        json.loads(msg.body)

    with pytest.raises(RejectMessage):
        await dead_letter_middleware("generator", msg, Broker()).consume_scope(decoding, msg)
    assert len(stored) == 1
