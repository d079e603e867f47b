"""Dead letters: what the bus does with a message it gives up on.

A handler that raises :class:`PermanentFailure` (or gets a payload that does not validate) has its
message copied to ``seal.dlq.<service>.<subject>`` with the reason, then terminated; a transient
failure is retried with a growing delay and dead-lettered on its last delivery
(:class:`DeadLetterMiddleware`, installed by :func:`shared.broker.create_broker`). A message whose
handler never answered (the pod killed on every delivery) is copied from JetStream's
max-deliveries advisory (:func:`dead_letter_exhausted_deliveries`). A copy is stored with
JetStream's acknowledgement before its message is terminated.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from shared.subjects import CONSUMERS, DLQ_PREFIX, DLQ_STREAM, EVENTS_STREAM, ConsumerSpec, dead_letter_subject
from shared.telemetry import feedback_id_of, root_traceparent

log = logging.getLogger(__name__)

REASON_HEADER = "Seal-Dead-Letter-Reason"
# A dead-letter copy is stored with JetStream's acknowledgement, tried this many times; a message
# whose copy could not be stored goes back to its stream and is tried again this much later.
DEAD_LETTER_TRIES = 3
DEAD_LETTER_BACKOFF_S = 0.5  # doubled after each failed try
DEAD_LETTER_RETRY_S = 30.0
SERVICE_HEADER = "Seal-Dead-Letter-Service"


class PermanentFailure(Exception):
    """Retrying cannot help: the message is dead-lettered and terminated."""


# Each durable consumer's spec by name: how many deliveries a message gets before it is dead-lettered.
_SPECS: dict[str, ConsumerSpec] = {spec.durable: spec for spec in CONSUMERS}


def remember_consumer(spec: ConsumerSpec) -> None:
    """Dead-letter this consumer's messages by its own delivery limit (:func:`shared.broker.durable_subscriber`)."""
    _SPECS[spec.durable] = spec


# JetStream's notice that a consumer gave up on a message: every delivery went unanswered.
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"
EXHAUSTED_QUEUE = "seal-exhausted-deliveries"


def dead_letter_exhausted_deliveries(broker: NatsBroker, stream: str = EVENTS_STREAM) -> Any:
    """Subscribe ``broker`` to copy every message a consumer of ``stream`` gave up on into the dead letters.

    The middleware dead-letters what a handler failed on; a message whose handler never answered
    (the pod OOM-killed, evicted, or outrunning the ack wait on every delivery) runs out of
    deliveries with no exception anywhere, and JetStream only says so in an advisory. This copies
    it, by its stream sequence, to ``seal.dlq.<service>.<subject>`` with the reason; one replica per
    advisory (a queue group), and a copy made twice is stored once (its ``Nats-Msg-Id``)."""

    @broker.subscriber(MAX_DELIVERIES_ADVISORY.format(stream=stream), queue=EXHAUSTED_QUEUE)
    async def on_exhausted(advisory: Any) -> None:
        try:
            source, consumer = str(advisory["stream"]), str(advisory["consumer"])
            sequence, deliveries = int(advisory["stream_seq"]), int(advisory["deliveries"])
        except (KeyError, TypeError, ValueError, IndexError):
            log.error("unreadable max-deliveries advisory: %r", advisory)
            return
        try:
            await _copy_exhausted(broker, source, consumer, sequence, deliveries)
        except Exception:  # noqa: BLE001 - an advisory is not redelivered: say what was not copied
            log.exception("could not dead-letter %s sequence %d, given up by consumer %s", source, sequence, consumer)

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
    headers["Nats-Msg-Id"] = f"exhausted-{source}-{sequence}-{consumer}"
    # The copy stays in the trace of the message it copies (not the advisory's own).
    if "traceparent" not in headers and (feedback_id := feedback_id_of(original.data)):
        headers["traceparent"] = root_traceparent(feedback_id)
    token = otel_context.attach(TraceContextTextMapPropagator().extract(headers))
    try:
        stored = await store_dead_letter(broker, original.data, dead_letter_subject(service, original.subject), headers)
    finally:
        otel_context.detach(token)
    if stored:
        log.error("dead-lettered message on %s: %s", original.subject, reason)
    else:
        log.error("could not dead-letter %s sequence %d, given up by consumer %s", source, sequence, consumer)


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
            subject = getattr(msg, "raw_message", None) and msg.raw_message.subject
            delivered, limit, _ = _deliveries(msg)
            if delivered >= limit:
                reason = f"interrupted by a shutdown on its last delivery ({delivered} of {limit}): {exc}"
                log.error("dead-lettering message on %s: %s", subject, reason)
                await self._reject(msg, reason, exc)
            log.warning("message on %s handed back for redelivery: the %s is shutting down (%s)", subject, self.service, exc)
            raise NackMessage() from exc
        except (PermanentFailure, ev.EventValidationError, ValidationError, RecursionError) as exc:
            # RecursionError: JSON nested too deep for the decoder to read; no retry reads it either.
            reason = _readable(exc)
            log.warning("rejecting message on %s: %s", getattr(msg, "raw_message", None) and msg.raw_message.subject, reason)
            await self._reject(msg, reason, exc)
        except Exception as exc:
            unreadable = _unreadable_body(msg)
            if unreadable is not None:
                # FastStream decodes the body before the handler runs, and its errors (a JSON
                # syntax error, an integer of thousands of digits) look transient; no retry reads it.
                log.warning("rejecting message on %s: %s", getattr(msg, "raw_message", None) and msg.raw_message.subject, unreadable)
                await self._reject(msg, unreadable, exc)
            delivered, limit, spec = _deliveries(msg)
            reason = f"{type(exc).__name__}: {exc}"
            if delivered >= limit:
                log.error("giving up after %d deliveries: %s", delivered, reason)
                await self._reject(msg, f"failed {delivered} times; last error: {reason}", exc)
            backoff = spec.backoff if spec and spec.backoff else (1.0,)
            delay = backoff[min(delivered - 1, len(backoff) - 1)]
            log.warning("transient failure (delivery %d of %d), retrying in %ss: %s", delivered, limit, delay, reason)
            raise NackMessage(delay=delay) from exc

    async def _reject(self, msg: Any, reason: str, exc: Exception) -> NoReturn:
        """Terminate the message once its dead-letter copy is stored; without a copy, hand it back."""
        if await self._dead_letter(msg, reason):
            raise RejectMessage() from exc
        delivered, limit, _ = _deliveries(msg)
        subject = getattr(getattr(msg, "raw_message", None), "subject", "unknown")
        if delivered < limit:
            log.error("no dead-letter copy of the message on %s could be stored; handing it back for another try in %ss",
                      subject, DEAD_LETTER_RETRY_S)
            raise NackMessage(delay=DEAD_LETTER_RETRY_S) from exc
        log.error("no dead-letter copy of the message on %s could be stored on its last delivery; it is still in its "
                  "stream (%s): %s", subject, _stream_position(msg), reason)
        raise RejectMessage() from exc

    async def _dead_letter(self, msg: Any, reason: str) -> bool:
        """Store a copy in the dead-letter stream (acknowledged by JetStream); False if that failed."""
        raw = getattr(msg, "raw_message", None)
        subject = getattr(raw, "subject", "unknown")
        if subject.startswith(f"{DLQ_PREFIX}."):
            # A dead letter that fails again is dropped here, never dead-lettered in a loop.
            log.error("dropping unprocessable dead letter on %s: %s", subject, reason)
            return True
        broker = self.context.get("broker")
        if broker is None:
            log.error("no broker in context; cannot dead-letter message on %s", subject)
            return False
        headers = dead_letter_headers(getattr(raw, "headers", None), reason, self.service)
        return await store_dead_letter(broker, msg.body, dead_letter_subject(self.service, subject), headers)


def dead_letter_headers(original: dict[str, str] | None, reason: str, service: str) -> dict[str, str]:
    """The original's headers (but its message id), with why and by which service it was given up."""
    headers = {k: v for k, v in (original or {}).items() if k != "Nats-Msg-Id"}
    headers[REASON_HEADER] = reason[:4000]
    headers[SERVICE_HEADER] = service
    return headers


async def store_dead_letter(broker: NatsBroker, body: bytes, subject: str, headers: dict[str, str]) -> bool:
    """Publish a dead-letter copy to its stream, acknowledged by JetStream, in a few tries; False if none took."""
    for attempt in range(DEAD_LETTER_TRIES):
        try:
            await broker.publish(body, subject, headers=headers, stream=DLQ_STREAM)
            return True
        except Exception:  # noqa: BLE001 - losing the copy must not crash the consumer
            log.exception("could not dead-letter message to %s (try %d of %d)", subject, attempt + 1, DEAD_LETTER_TRIES)
            if attempt + 1 < DEAD_LETTER_TRIES:
                await asyncio.sleep(DEAD_LETTER_BACKOFF_S * 2**attempt)
    return False


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
