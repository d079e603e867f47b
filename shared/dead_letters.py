"""Dead letters: what the bus does with a message it gives up on.

A handler that raises :class:`PermanentFailure` (or gets a payload that does not validate) has its
message copied to ``seal.dlq.<service>.<subject>`` with the reason, then terminated; a transient
failure is retried with a growing delay and dead-lettered on its last delivery
(:class:`DeadLetterMiddleware`, installed by :func:`shared.broker.create_broker`). A message whose
handler never answered (the pod killed on every delivery) is copied from JetStream's
max-deliveries advisory (:func:`dead_letter_exhausted_deliveries`). A copy is stored with
JetStream's acknowledgement before its message is terminated.

Every retry and every dead-lettering is logged on one line that names the message (subject, event
type and id, feedback id, stream sequence: :func:`message_fields`) and, once stored, the copy's
dead-letter sequence (what ``seal replay`` takes), with the handler's exception and its traceback;
the same fields ride on the log record (``extra``) for a structured log handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from email.header import Header, decode_header
from typing import Any, NoReturn

from faststream import BaseMiddleware
from faststream.exceptions import NackMessage, RejectMessage
from faststream.nats import NatsBroker
from nats.js.errors import NotFoundError
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from shared import events as ev
from shared.shutdown import Interrupted
from shared.subjects import (
    CONSUMERS,
    DLQ_PREFIX,
    DLQ_STREAM,
    REGISTRY_EXHAUSTED,
    RPC_PREFIX,
    ConsumerSpec,
    dead_letter_subject,
)
from shared.telemetry import lineage_of, root_traceparent

log = logging.getLogger(__name__)

REASON_HEADER = "Seal-Dead-Letter-Reason"
# A dead-letter copy is stored with JetStream's acknowledgement, tried this many times; a message
# whose copy could not be stored goes back to its stream and is tried again this much later.
DEAD_LETTER_TRIES = 3
DEAD_LETTER_BACKOFF_S = 0.5  # doubled after each failed try
DEAD_LETTER_RETRY_S = 30.0
# JetStream's acknowledgement of a publish (an event, a dead-letter copy) is waited for this long.
# FastStream's own default, half a second, failed publishes on a replicated stream busy with a
# leader election or a slow disk: a training of minutes was then done again for its event.
PUBLISH_ACK_TIMEOUT_S = 5.0
SERVICE_HEADER = "Seal-Dead-Letter-Service"
# On a copy without the original's body: the original and the copy's headers would exceed the
# server's message limit (a NATS server closes the connection of a client that publishes one).
TRUNCATED_HEADER = "Seal-Dead-Letter-Truncated"


@dataclass(frozen=True)
class StoredDeadLetter:
    """A dead-letter copy as JetStream acknowledged it: ``sequence`` is what ``seal replay`` takes."""

    subject: str
    stream: str | None = None
    sequence: int | None = None

    def __str__(self) -> str:
        if self.sequence is None:
            return f"dead letter on {self.subject} (no sequence acknowledged)"
        return f"dead letter {self.sequence} (stream {self.stream or DLQ_STREAM}, subject {self.subject})"


class PermanentFailure(Exception):
    """Retrying cannot help: the message is dead-lettered and terminated."""


# Each durable consumer's spec by name: how many deliveries a message gets before it is dead-lettered.
_SPECS: dict[str, ConsumerSpec] = {spec.durable: spec for spec in CONSUMERS}


def remember_consumer(spec: ConsumerSpec) -> None:
    """Dead-letter this consumer's messages by its own delivery limit (:func:`shared.broker.durable_subscriber`)."""
    _SPECS[spec.durable] = spec


def dead_letter_exhausted_deliveries(broker: NatsBroker) -> Any:
    """Subscribe ``broker`` to copy every message a consumer of the events gave up on into the dead letters.

    The middleware dead-letters what a handler failed on; a message whose handler never answered
    (the pod OOM-killed, evicted, or outrunning the ack wait on every delivery) runs out of
    deliveries with no exception anywhere, and JetStream only says so in an advisory. This copies
    it, by its stream sequence, to ``seal.dlq.<service>.<subject>`` with the reason. The advisories
    are read from their stream (``SEAL_ADVISORIES``) by a durable consumer shared by the replicas:
    one published while no registry ran is read when one starts, and a copy that could not be
    stored is tried again (a copy made twice is stored once: its ``Nats-Msg-Id``)."""
    from shared.broker import durable_subscriber  # which imports this module

    @durable_subscriber(broker, REGISTRY_EXHAUSTED)
    async def on_exhausted(advisory: Any) -> None:
        try:
            source, consumer = str(advisory["stream"]), str(advisory["consumer"])
            sequence, deliveries = int(advisory["stream_seq"]), int(advisory["deliveries"])
        except (KeyError, TypeError, ValueError, IndexError):
            log.error("unreadable max-deliveries advisory: %r", advisory)
            return
        await _copy_exhausted(broker, source, consumer, sequence, deliveries)

    return on_exhausted


async def _copy_exhausted(broker: NatsBroker, source: str, consumer: str, sequence: int, deliveries: int) -> None:
    js = broker.config.connection_state.stream
    try:
        original = await js.get_msg(source, sequence)
    except NotFoundError:
        log.error("consumer %s gave up on %s sequence %d, which is no longer in the stream", consumer, source, sequence)
        return
    service = consumer.split("-", 1)[0]
    reason = (f"no answer after {deliveries} deliveries to consumer {consumer}: its handler crashed or outran "
              f"the ack wait every time (stream {source}, sequence {sequence})")
    headers = dead_letter_headers(original.headers, reason, service)
    headers["Nats-Msg-Id"] = copy_id(source, sequence, consumer)
    # The copy stays in the trace of the message it copies (not the advisory's own).
    if "traceparent" not in headers and (lineage := lineage_of(original.data)):
        headers["traceparent"] = root_traceparent(*lineage)
    token = otel_context.attach(TraceContextTextMapPropagator().extract(headers))
    try:
        stored = await store_dead_letter(broker, original.data, dead_letter_subject(service, original.subject), headers,
                                         f"stream {source} at sequence {sequence}")
    finally:
        otel_context.detach(token)
    fields = message_fields(original.data, original.subject, original.headers, source, sequence)
    if stored:
        log.error("dead-lettered message [%s]: %s; stored as %s", describe(fields), reason, stored,
                  extra=_extra(fields, stored))
    else:  # tried again: the advisory goes back to its stream
        raise RuntimeError(f"could not dead-letter message [{describe(fields)}], given up by consumer {consumer}")


class DeadLetterMiddleware(BaseMiddleware):
    """Dead-letters permanent failures at once and transient ones on their last try."""

    service: str = "unknown"

    @classmethod
    def for_service(cls, service: str) -> type["DeadLetterMiddleware"]:
        return type(f"DeadLetter_{service}", (cls,), {"service": service})

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        try:
            return await call_next(msg)
        except (RejectMessage, NackMessage):
            raise
        except Interrupted as exc:
            # Not a failure: the process is shutting down. Back to JetStream at once, for another
            # replica; on its last delivery JetStream would drop it, so it is dead-lettered instead.
            delivered, limit, _ = _deliveries(msg)
            if delivered >= limit:
                reason = f"interrupted by a shutdown on its last delivery ({delivered} of {limit}): {exc}"
                await self._reject(msg, reason, exc, "dead-lettering", logging.ERROR)
            fields = _fields_of(msg)
            log.warning("message [%s] handed back for redelivery: the %s is shutting down (%s)",
                        describe(fields), self.service, _one_line(str(exc)), extra=_extra(fields))
            raise NackMessage() from exc
        except (PermanentFailure, ev.EventValidationError, ValidationError, RecursionError) as exc:
            # RecursionError: JSON nested too deep for the decoder to read; no retry reads it either.
            await self._reject(msg, _readable(exc), exc, "rejecting", logging.WARNING)
        except Exception as exc:
            unreadable = _unreadable_body(msg)
            if unreadable is not None:
                # FastStream decodes the body before the handler runs, and its errors (a JSON
                # syntax error, an integer of thousands of digits) look transient; no retry reads it.
                await self._reject(msg, unreadable, exc, "rejecting", logging.WARNING)
            delivered, limit, spec = _deliveries(msg)
            reason = f"{type(exc).__name__}: {exc}"
            if delivered >= limit:
                await self._reject(msg, f"failed {delivered} times; last error: {reason}", exc,
                                   f"giving up after {delivered} deliveries on", logging.ERROR)
            backoff = spec.backoff if spec and spec.backoff else (1.0,)
            delay = backoff[min(delivered - 1, len(backoff) - 1)]
            fields = _fields_of(msg)
            log.warning("transient failure (delivery %d of %d) on message [%s], retrying in %ss: %s", delivered, limit,
                        describe(fields), delay, _one_line(reason), exc_info=exc, extra=_extra(fields))
            raise NackMessage(delay=delay) from exc

    async def _reject(self, msg: Any, reason: str, exc: BaseException, what: str, level: int) -> NoReturn:
        """Terminate the message once its dead-letter copy is stored; without a copy, hand it back.

        Logs one line: ``what`` (rejecting, giving up after N deliveries on, ...) the message, why, and
        where its copy was stored (or that none could be), with ``exc`` and its traceback."""
        fields = _fields_of(msg)
        about, why = describe(fields), _one_line(reason)
        subject = fields["subject"] or "unknown"
        if subject.startswith(f"{RPC_PREFIX}."):
            # A request (core NATS, not a stream's message): its caller is answered with the reason.
            # Never stored: its headers carry the caller's API token, and a caller could fill the
            # dead letters with requests.
            log.warning("%s request [%s]: %s; answered with the reason", what, about, why, extra=_extra(fields))
            raw = getattr(msg, "raw_message", None)
            if getattr(raw, "reply", None):
                with contextlib.suppress(Exception):
                    await raw.respond(json.dumps({"ok": False, "status": 400, "error": why[:1000]}).encode())
            raise RejectMessage() from exc
        if subject.startswith(f"{DLQ_PREFIX}."):
            # A dead letter that fails again is dropped here, never dead-lettered in a loop.
            log.error("%s message [%s]: %s; dropped: an unprocessable dead letter is not dead-lettered again",
                      what, about, why, exc_info=exc, extra=_extra(fields))
            raise RejectMessage() from exc
        stored = await self._dead_letter(msg, reason)
        if stored:
            log.log(level, "%s message [%s]: %s; stored as %s", what, about, why, stored,
                    exc_info=exc, extra=_extra(fields, stored))
            raise RejectMessage() from exc
        delivered, limit, _ = _deliveries(msg)
        if delivered < limit:
            log.error("%s message [%s]: %s; no dead-letter copy could be stored, handing it back for another try in %ss",
                      what, about, why, DEAD_LETTER_RETRY_S, exc_info=exc, extra=_extra(fields))
            raise NackMessage(delay=DEAD_LETTER_RETRY_S) from exc
        log.error("%s message [%s]: %s; no dead-letter copy could be stored on its last delivery; it is still in its "
                  "stream (%s)", what, about, why, _stream_position(msg), exc_info=exc, extra=_extra(fields))
        raise RejectMessage() from exc

    async def _dead_letter(self, msg: Any, reason: str) -> StoredDeadLetter | None:
        """Store a copy in the dead-letter stream (acknowledged by JetStream); None if that failed."""
        raw = getattr(msg, "raw_message", None)
        subject = getattr(raw, "subject", "unknown")
        broker = self.context.get("broker")
        if broker is None:
            log.error("no broker in context; cannot dead-letter message on %s", subject)
            return None
        headers = dead_letter_headers(getattr(raw, "headers", None), reason, self.service)
        origin = None
        try:
            meta = raw.metadata  # type: ignore[union-attr]
            headers["Nats-Msg-Id"] = copy_id(meta.stream, int(meta.sequence.stream), meta.consumer)
            origin = f"stream {meta.stream} at sequence {int(meta.sequence.stream)}"
        except Exception:  # noqa: BLE001 - core NATS or the in-memory test broker: no position to name it by
            pass
        return await store_dead_letter(broker, msg.body, dead_letter_subject(self.service, subject), headers, origin)


def header_text(value: object) -> str:
    """A header value as text: nats-py hands one with non-ASCII characters over (from a stream read)
    as an ``email.header.Header``, which is no string and which it cannot publish again."""
    if not isinstance(value, Header):
        return str(value)
    try:
        return "".join(
            # the raw bytes, marked "unknown-8bit" by the parser: NATS headers are UTF-8
            part.decode("utf-8" if charset in (None, "unknown-8bit") else charset, "replace") if isinstance(part, bytes) else part
            for part, charset in decode_header(value)
        )
    except (LookupError, ValueError):  # an unknown charset
        return str(value)


# Headers the publish adds after the check (FastStream's content type and correlation id, the
# trace context and its baggage), with room to spare.
PUBLISH_HEADER_ROOM = 8192


def _over_limit(broker: Any, body: bytes, headers: dict[str, str]) -> int | None:
    """The server's message limit where a copy of ``body`` with ``headers`` would exceed it, else None
    (the client checks only the body against it; the server counts the headers too)."""
    try:
        limit = broker.config.connection_state.connection.max_payload
    except Exception:  # noqa: BLE001 - not connected: nothing known to check against
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        return None  # FastStream's in-memory test broker: no server, no limit
    size = len(body) + len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())
    return limit if size + PUBLISH_HEADER_ROOM > limit else None


def copy_id(stream: str, sequence: int, consumer: str) -> str:
    """The message id of a dead-letter copy: the same whichever way a message is given up on (its
    handler's last failure, or JetStream's max-deliveries notice after a terminate that was lost),
    so JetStream stores one copy."""
    return f"dead-{stream}-{sequence}-{consumer}"


# Never stored with a copy: credentials (a registry request's API token) in a stream every
# service's user can read.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def dead_letter_headers(original: dict[str, Any] | None, reason: str, service: str) -> dict[str, str]:
    """The original's headers, as text, with why and by which service it was given up. Not the
    server's own (``Nats-*``: its message id, and directives such as an expected last sequence or a
    rollup, which would make JetStream refuse the copy), nor credentials."""
    headers = {
        str(k): header_text(v) for k, v in (original or {}).items()
        if not str(k).lower().startswith("nats-") and str(k).lower() not in SECRET_HEADERS
    }
    headers[REASON_HEADER] = reason[:4000]
    headers[SERVICE_HEADER] = service
    return headers


async def store_dead_letter(
    broker: NatsBroker, body: bytes, subject: str, headers: dict[str, str], origin: str | None = None,
) -> StoredDeadLetter | None:
    """Publish a dead-letter copy to its stream, acknowledged by JetStream, in a few tries: where it was
    stored (its dead-letter sequence from the acknowledgement), or None if no try took.

    A copy over the server's message limit (an original near it, plus the reason) keeps the reason
    and where the original is (``origin``: its stream and sequence), not its body."""
    if (limit := _over_limit(broker, body, headers)) is not None:
        where = f": it stays in {origin} until the stream's retention removes it" if origin else ""
        headers = {**headers, TRUNCATED_HEADER: f"the original's {len(body)} bytes, with the reason, are over the "
                                                f"server's message limit of {limit} bytes{where}"}
        body = b""
    for attempt in range(DEAD_LETTER_TRIES):
        try:
            ack = await broker.publish(body, subject, headers=headers, stream=DLQ_STREAM, timeout=PUBLISH_ACK_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - losing the copy must not crash the consumer
            log.exception("could not dead-letter message to %s (try %d of %d)", subject, attempt + 1, DEAD_LETTER_TRIES)
            if attempt + 1 < DEAD_LETTER_TRIES:
                await asyncio.sleep(DEAD_LETTER_BACKOFF_S * 2**attempt)
            continue
        sequence = getattr(ack, "seq", None)
        return StoredDeadLetter(subject, getattr(ack, "stream", None) or DLQ_STREAM,
                                sequence if isinstance(sequence, int) else None)
    return None


def message_fields(
    body: Any, subject: str | None, headers: dict[str, str] | None = None,
    stream: str | None = None, sequence: int | None = None,
) -> dict[str, Any]:
    """What ties a log line to a message: its subject, event type and id, feedback id and stream position.

    Read from the raw body, which may be no event at all (a value that is not known is None); the event
    id falls back to the ``Nats-Msg-Id`` header, which :func:`shared.broker.publish_event` sets to it."""
    event: Any = None
    if isinstance(body, bytes | str) and body:
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            event = None
    event = event if isinstance(event, dict) else {}
    msg_id = (headers or {}).get("Nats-Msg-Id") if isinstance(headers, dict) else None
    return {
        "subject": subject,
        "event_type": _text(event.get("type")),
        "event_id": _text(event.get("event_id")) or _text(msg_id),
        "feedback_id": _text(event.get("feedback_id")),
        "stream": stream,
        "stream_seq": sequence,
    }


def describe(fields: dict[str, Any]) -> str:
    """``subject=... type=... event_id=... feedback_id=... stream_seq=SEAL_EVENTS:42``, what is known of it."""
    parts = [f"subject={_token(fields.get('subject') or 'unknown')}"]
    parts += [f"{label}={_token(fields[key])}" for key, label in
              (("event_type", "type"), ("event_id", "event_id"), ("feedback_id", "feedback_id")) if fields.get(key)]
    if fields.get("stream_seq") is not None:
        parts.append(f"stream_seq={_token(fields.get('stream') or '?')}:{fields['stream_seq']}")
    return " ".join(parts)


def described(msg: Any) -> str:
    """A FastStream message as :func:`describe` puts it, for a log line."""
    return describe(_fields_of(msg))


def _fields_of(msg: Any) -> dict[str, Any]:
    raw = getattr(msg, "raw_message", None)
    stream = sequence = None
    try:
        meta = raw.metadata  # type: ignore[union-attr]
        stream, sequence = meta.stream, int(meta.sequence.stream)
    except Exception:  # noqa: BLE001 - core NATS or the in-memory test broker
        pass
    headers = getattr(raw, "headers", None)
    return message_fields(getattr(msg, "body", None), getattr(raw, "subject", None), headers, stream, sequence)


def _extra(fields: dict[str, Any], stored: StoredDeadLetter | None = None) -> dict[str, Any]:
    """The fields as log record attributes (``extra``), the dead letter's sequence among them where stored."""
    return {**fields, "dead_letter_subject": stored.subject if stored else None,
            "dead_letter_seq": stored.sequence if stored else None}


_PLAIN = re.compile(r"[\w.:@/+=-]{1,200}")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _token(value: Any) -> str:
    """A value as one word of a log line: quoted (and cut) where a body's text would break it."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else ascii(text[:200])


def _one_line(text: str) -> str:
    """An exception's text on one line (the traceback follows the line; the reason stays readable)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _deliveries(msg: Any) -> tuple[int, int, ConsumerSpec | None]:
    """(times delivered, the most its consumer delivers, the consumer's spec if known)."""
    delivered, durable = _delivery(msg)
    spec = _SPECS.get(durable or "")
    return delivered, spec.max_deliver if spec else 1, spec


def _stream_position(msg: Any) -> str:
    try:
        meta = msg.raw_message.metadata
        return f"stream {meta.stream}, sequence {meta.sequence.stream}"
    except Exception:  # noqa: BLE001 - core NATS or the in-memory test broker
        return "position unknown"


def _readable(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid payload: {ev.describe_validation_error(exc)}"
    if isinstance(exc, RecursionError):
        return "invalid payload: nested too deeply to read"
    return str(exc) or type(exc).__name__


def _unreadable_body(msg: Any) -> str | None:
    """Why the message's body is no JSON at all, or None where it is (or there is no body)."""
    body = getattr(msg, "body", None)
    if not isinstance(body, bytes | str) or not body:
        return None
    try:
        json.loads(body)
    except RecursionError:
        return "invalid payload: nested too deeply to read"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        return f"invalid payload: not readable as JSON ({str(exc)[:200]})"
    return None


def _delivery(msg: Any) -> tuple[int, str | None]:
    """(times delivered, durable consumer name), or (1, None) outside JetStream."""
    try:
        meta = msg.raw_message.metadata
        return int(meta.num_delivered), meta.consumer
    except Exception:  # noqa: BLE001 - core NATS or the in-memory test broker
        return 1, None
