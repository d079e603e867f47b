"""The bus: broker factory, stream setup, durable subscribers, publishing.

Delivery contract, the same for every service:

* Durable pull consumers shared by all replicas (:func:`durable_subscriber`),
  explicit acks (``NACK_ON_ERROR``).
* A handler that raises :class:`PermanentFailure` (or receives a payload that
  does not validate) gets its message dead-lettered at once with the reason
  and terminated: it is never redelivered.
* Any other exception is a transient failure: the message is nak'ed with a
  growing delay and redelivered, up to the consumer's ``max_deliver``; the
  last failure dead-letters it.
* A handler stopped by :class:`~shared.shutdown.Interrupted` (its process is
  shutting down) has its message nak'ed at once, for another replica to take;
  it is not a failure, but it is a delivery: on the last one the message is
  dead-lettered rather than dropped.
* A dead-letter copy is stored with JetStream's acknowledgement before its
  message is terminated; a copy that cannot be stored (the dead-letter stream
  unreachable or full) leaves the message in its stream, nak'ed for another
  try 30 s later.
* :func:`publish_event` sets ``Nats-Msg-Id`` to the event id, so a duplicate
  publish inside the stream's duplicate window is dropped by JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any, NoReturn

import nats
from faststream import AckPolicy, BaseMiddleware
from faststream.exceptions import NackMessage, RejectMessage
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from shared import events as ev
from shared.settings import NatsSettings
from shared.shutdown import Interrupted
from shared.subjects import (
    CONSUMERS,
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_STREAM,
    KV_BUCKETS,
    KV_MAX_AGE,
    STREAMS,
    ConsumerSpec,
    dead_letter_subject,
    subject_for,
)
from shared.telemetry import mark_lineage, root_traceparent

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


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` / ``NatsBroker`` from settings."""
    options: dict[str, Any] = {"connect_timeout": max(1, int(settings.connect_timeout_s))}
    if settings.user:
        options["user"] = settings.user
    if settings.password:
        options["password"] = settings.password.get_secret_value()
    if settings.token:
        options["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        options["user_credentials"] = str(settings.creds_file)
    return options


def create_broker(
    settings: NatsSettings,
    *,
    service: str,
    tracer_provider: TracerProvider | None = None,
    extra_middlewares: Iterable[Any] = (),
) -> NatsBroker:
    """A NatsBroker with OpenTelemetry propagation and dead-lettering installed."""
    return NatsBroker(
        settings.url,
        name=f"seal-{service}",
        middlewares=(
            TraceRootMiddleware,
            NatsTelemetryMiddleware(tracer_provider=tracer_provider),
            DeadLetterMiddleware.for_service(service),
            *extra_middlewares,
        ),
        graceful_timeout=30.0,
        **connect_options(settings),
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create (or update) every stream and KV bucket; safe to call on every start.

    ``replicas`` applies to existing ones too: raising it (a single server grown into a
    three-node cluster) turns the streams and the buckets' streams into R3."""
    for spec in STREAMS:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            max_age=spec.max_age.total_seconds(),
            duplicate_window=spec.duplicate_window.total_seconds(),
            storage=StorageType.FILE,
            num_replicas=replicas,
        )
        try:
            await js.stream_info(spec.name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
    for bucket in KV_BUCKETS:
        age = KV_MAX_AGE.get(bucket)
        max_age = age.total_seconds() if age else None
        try:
            info = await js.stream_info(f"KV_{bucket}")  # the stream behind the bucket
        except NotFoundError:
            await js.create_key_value(bucket=bucket, history=16, replicas=replicas, ttl=max_age)
            continue
        # Replicas and the keys' lifetime apply to a bucket made by an earlier version too.
        if info.config.num_replicas != replicas or (info.config.max_age or None) != max_age:
            await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas, max_age=max_age or 0))


async def ensure_streams_at(settings: NatsSettings) -> None:
    """Connect, create streams and buckets, disconnect."""
    nc = await nats.connect(settings.url, **connect_options(settings))
    try:
        await ensure_streams(nc.jetstream(), settings.stream_replicas)
    finally:
        await nc.close()


def durable_subscriber(broker: NatsBroker, spec: ConsumerSpec, **kwargs: Any) -> Any:
    """Decorator: a durable pull consumer that every replica of a service shares."""
    _SPECS[spec.durable] = spec
    _BROKER_SPECS.setdefault(broker, []).append(spec)
    return broker.subscriber(
        spec.subject,
        stream=JStream(spec.stream, declare=False),
        durable=spec.durable,
        pull_sub=PullSub(batch_size=1, timeout=5.0),
        config=ConsumerConfig(
            durable_name=spec.durable,
            max_deliver=spec.max_deliver,
            ack_wait=spec.ack_wait.total_seconds(),
            filter_subject=spec.subject,
        ),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        **kwargs,
    )


async def reconcile_consumers(broker: NatsBroker) -> list[str]:
    """Bring the broker's durable consumers that already exist to their specs' ack wait and delivery limit.

    JetStream keeps a durable consumer's settings from its creation, and subscribing again does not
    change them: without this, raising ``max_deliver`` or ``ack_wait`` (``SEAL_TRAINER__MAX_DELIVER``,
    ``SEAL_TRAINER__ACK_WAIT_S``) would change what the service assumes (its dead-letter limit, its
    in-progress beat) but not what the server does, and messages would be redelivered mid-work or
    dropped undead-lettered. Call it once the broker is connected; returns what it changed.

    A failure is logged, not raised: the service serves with its consumers as they are rather
    than not at all."""
    changed: list[str] = []
    specs = _BROKER_SPECS.get(broker, [])
    if not specs:
        return changed
    js = broker.config.connection_state.stream
    try:
        for spec in specs:
            try:
                info = await js.consumer_info(spec.stream, spec.durable)
            except NotFoundError:
                continue
            ack_wait = spec.ack_wait.total_seconds()
            have = info.config
            if have.max_deliver == spec.max_deliver and abs((have.ack_wait or 0.0) - ack_wait) < 1e-3:
                continue
            await js.add_consumer(spec.stream, have.evolve(ack_wait=ack_wait, max_deliver=spec.max_deliver))
            what = (f"consumer {spec.durable}: ack_wait {have.ack_wait:g}s -> {ack_wait:g}s, "
                    f"max_deliver {have.max_deliver} -> {spec.max_deliver}")
            log.warning("updated %s (it kept the settings it was created with)", what)
            changed.append(what)
    except Exception:  # noqa: BLE001 - serve with the consumers as they are rather than not at all
        log.exception("could not bring the durable consumers to their configured ack wait and delivery limit")
    return changed


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
    if "traceparent" not in headers and (feedback_id := _feedback_id_of(original.data)):
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


async def publish_event(broker: NatsBroker, event: ev.Event) -> None:
    """Publish an event to its subject through JetStream, de-duplicated by event id."""
    mark_lineage(event.feedback_id, event.scope)
    await broker.publish(
        event.model_dump(mode="json"),
        subject_for(event),
        headers={"Nats-Msg-Id": event.event_id},
        stream=_stream_of(event),
    )


def _stream_of(event: ev.Event) -> str:
    subject = subject_for(event)
    for spec in STREAMS:
        if any(subject.startswith(s.rstrip(">")) for s in spec.subjects):
            return spec.name
    raise LookupError(f"no stream holds subject {subject}")


_SPECS: dict[str, ConsumerSpec] = {spec.durable: spec for spec in CONSUMERS}
# The specs each broker subscribes with (reconcile_consumers).
_BROKER_SPECS: weakref.WeakKeyDictionary[NatsBroker, list[ConsumerSpec]] = weakref.WeakKeyDictionary()


class TraceRootMiddleware(BaseMiddleware):
    """An event that came without trace context joins its feedback's own trace.

    FastStream starts a new trace for a message with no ``traceparent``: a product publishing
    feedback on the bus itself would have the generator and the registry each start their own,
    and every redelivery another. Here such a message gets the feedback's root
    (:func:`shared.telemetry.root_traceparent`) before the telemetry middleware reads it."""

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        headers = getattr(msg, "headers", None)
        if isinstance(headers, dict) and "traceparent" not in headers:
            feedback_id = _feedback_id_of(getattr(msg, "body", b""))
            if feedback_id:
                headers["traceparent"] = root_traceparent(feedback_id)
        return await call_next(msg)


def _feedback_id_of(body: Any) -> str | None:
    try:
        value = json.loads(body).get("feedback_id")
    except (ValueError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


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
        except (PermanentFailure, ev.EventValidationError, ValidationError) as exc:
            reason = _readable(exc)
            log.warning("rejecting message on %s: %s", getattr(msg, "raw_message", None) and msg.raw_message.subject, reason)
            await self._reject(msg, reason, exc)
        except Exception as exc:
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
    return str(exc) or type(exc).__name__


def _delivery(msg: Any) -> tuple[int, str | None]:
    """(times delivered, durable consumer name), or (1, None) outside JetStream."""
    try:
        meta = msg.raw_message.metadata
        return int(meta.num_delivered), meta.consumer
    except Exception:  # noqa: BLE001 - core NATS or the in-memory test broker
        return 1, None


@contextlib.asynccontextmanager
async def kept_in_progress(message: Any, every_s: float) -> AsyncIterator[None]:
    """Tell JetStream every ``every_s`` seconds that ``message`` is still being worked on.

    For handlers that run longer than the consumer's ack wait (generation,
    training, evaluation), so the message is not redelivered meanwhile. The
    beat stops on a flag as well as on cancellation: nats-py swallows a
    cancellation that lands inside a publish, which would leave it running.
    """
    done = asyncio.Event()

    async def beat() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), every_s)
                return
            try:
                await message.in_progress()
            except Exception as exc:  # noqa: BLE001 - a missed beat only risks a redelivery
                log.warning("could not extend the ack deadline: %s", exc)

    task = asyncio.create_task(beat(), name="in-progress-beat")
    try:
        yield
    finally:
        done.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
