"""The bus: broker factory, stream setup, durable subscribers, publishing (dead letters:
:mod:`shared.dead_letters`; connections and their liveness: :mod:`shared.connections`).

Delivery contract, the same for every service:

* Durable pull consumers shared by all replicas (:func:`durable_subscriber`),
  explicit acks (``NACK_ON_ERROR``).
* A handler that raises :class:`~shared.dead_letters.PermanentFailure` (or receives a payload that
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
  unreachable, or JetStream's store full; at its own byte limit the stream
  drops its oldest letters instead) leaves the message in its stream, nak'ed
  for another try 30 s later.
* :func:`publish_event` sets ``Nats-Msg-Id`` to the event id, so a duplicate
  publish inside the stream's duplicate window is dropped by JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import nats
import nats.errors
from faststream import AckPolicy, BaseMiddleware
from faststream.exceptions import IncorrectState
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import TracerProvider

from shared import events as ev
from shared.connections import (
    broker_security,
    connect_nats,
    connection_of,
    nats_trouble,
    note_broker_error,
    reconnect_options,
    remember_broker,
)
from shared.dead_letters import PUBLISH_ACK_TIMEOUT_S, DeadLetterMiddleware, described, remember_consumer
from shared.settings import NatsSettings
from shared.subjects import DLQ_STREAM, EVENTS_STREAM, KV_BUCKETS, KV_MAX_AGE, STREAMS, ConsumerSpec, subject_for
from shared.telemetry import lineage_of, mark_lineage, root_traceparent

log = logging.getLogger(__name__)

def create_broker(
    settings: NatsSettings,
    *,
    service: str,
    tracer_provider: TracerProvider | None = None,
    extra_middlewares: Iterable[Any] = (),
) -> NatsBroker:
    """A NatsBroker with OpenTelemetry propagation and dead-lettering installed (connect it with
    :func:`shared.connections.connect_broker`)."""

    async def noted(error: Exception) -> None:
        note_broker_error(broker, error)

    broker = NatsBroker(
        settings.url,
        name=f"seal-{service}",
        middlewares=(
            TraceRootMiddleware,
            NatsTelemetryMiddleware(tracer_provider=tracer_provider),
            DeadLetterMiddleware.for_service(service),
            *extra_middlewares,
        ),
        graceful_timeout=30.0,
        security=broker_security(settings),
        error_cb=noted,
        **reconnect_options(settings),
    )
    remember_broker(broker, settings)
    return broker


async def ensure_streams(js: JetStreamContext, settings: NatsSettings | None = None) -> None:
    """Create (or update) every stream and KV bucket; safe to call on every start.

    The settings' ``stream_replicas`` applies to existing ones too: raising it (a single server
    grown into a three-node cluster) turns the streams and the buckets' streams into R3; so do
    the streams' byte limits."""
    settings = settings or NatsSettings()
    replicas = settings.stream_replicas
    max_bytes = {EVENTS_STREAM: settings.events_max_bytes, DLQ_STREAM: settings.dead_letters_max_bytes}
    for spec in STREAMS:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            max_age=spec.max_age.total_seconds(),
            max_bytes=max_bytes.get(spec.name, -1),  # -1: no limit
            discard=DiscardPolicy.OLD,
            duplicate_window=spec.duplicate_window.total_seconds(),
            storage=StorageType.FILE,
            num_replicas=replicas,
        )
        try:
            existing = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        try:
            await js.update_stream(config)
        except APIError as exc:
            if exc.err_code != INSUFFICIENT_STORAGE:
                raise
            # A larger limit than the server's store can reserve (a service started by hand, with
            # the production limits, against a developer's stack on a small disk): keep the stream's.
            log.warning("could not raise stream %s to %d bytes (%s); it keeps its limit of %s bytes",
                        spec.name, config.max_bytes, exc.description, existing.config.max_bytes)
            await js.update_stream(dataclasses.replace(config, max_bytes=existing.config.max_bytes))
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
    nc = await connect_nats(settings)
    try:
        await ensure_streams(nc.jetstream(), settings)
    finally:
        await nc.close()


def durable_subscriber(broker: NatsBroker, spec: ConsumerSpec, **kwargs: Any) -> Any:
    """Decorator: a durable pull consumer that every replica of a service shares."""
    remember_consumer(spec)
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


async def missing_consumers(broker: NatsBroker, timeout_s: float = 3.0) -> list[str]:
    """The broker's durable consumers JetStream says are gone (deleted by hand, or their stream lost
    with the server's store). FastStream makes a consumer only when it subscribes: without it a
    replica fetches from nothing and takes no message again until it restarts (its init container
    then makes the streams, and its subscribe the consumers). What NATS does not answer in
    ``timeout_s`` (away, electing a leader) counts as there, and so does every consumer before the
    broker has started (its subscribers make them: a first start loads its model first)."""
    connection = connection_of(broker)
    if not getattr(broker, "running", False) or connection is None or not connection.is_connected:
        return []  # asked while NATS is away, the question would wait in nats-py's buffer
    try:
        js = broker.config.connection_state.stream
    except IncorrectState:
        return []
    missing: list[str] = []

    async def look(spec: ConsumerSpec) -> None:
        try:
            await js.consumer_info(spec.stream, spec.durable, timeout=timeout_s)
        except NotFoundError:
            missing.append(f"{spec.stream}/{spec.durable}")
        except Exception:  # noqa: BLE001 - no answer is not "gone"
            return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(look(s) for s in _BROKER_SPECS.get(broker, []))), timeout_s + 1)
    return sorted(missing)


async def bus_trouble(broker: NatsBroker, *own: nats.NATS | None) -> str | None:
    """Why the service's bus is broken for good (for liveness), else None: a connection of the broker
    or of the service's ``own`` that only a restart mends (:func:`shared.connections.nats_trouble`),
    or durable consumers of the broker JetStream says are gone (:func:`missing_consumers`)."""
    if trouble := nats_trouble(broker, *own):
        return trouble
    if gone := await missing_consumers(broker):
        return f"JetStream consumers gone: {', '.join(gone)}"
    return None


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
    for spec in specs:  # each on its own: one that fails must not keep the others as they were
        try:
            try:
                info = await js.consumer_info(spec.stream, spec.durable)
            except NotFoundError:
                continue
            ack_wait = spec.ack_wait.total_seconds()
            have = info.config
            same = (have.max_deliver == spec.max_deliver and abs((have.ack_wait or 0.0) - ack_wait) < 1e-3
                    and (have.filter_subject or spec.subject) == spec.subject)
            if same:
                continue
            # The subject too: a durable made for another subject (an event renamed) kept filtering
            # the old one, and its handler silently received nothing.
            await js.add_consumer(spec.stream, have.evolve(
                ack_wait=ack_wait, max_deliver=spec.max_deliver, filter_subject=spec.subject))
            what = (f"consumer {spec.durable}: ack_wait {have.ack_wait:g}s -> {ack_wait:g}s, "
                    f"max_deliver {have.max_deliver} -> {spec.max_deliver}, "
                    f"subject {have.filter_subject} -> {spec.subject}")
            log.warning("updated %s (it kept the settings it was created with)", what)
            changed.append(what)
        except Exception:  # noqa: BLE001 - serve with the consumers as they are rather than not at all
            log.exception("could not bring consumer %s to its configured subject, ack wait and delivery limit", spec.durable)
    return changed


async def publish_event(broker: NatsBroker, event: ev.Event) -> None:
    """Publish an event to its subject through JetStream, de-duplicated by event id, waiting up to
    :data:`~shared.dead_letters.PUBLISH_ACK_TIMEOUT_S` for JetStream's acknowledgement."""
    # The event's feedback rides in the baggage of this publish only: left attached, it stayed
    # in the caller's context (the registry's sweep) and went out with unrelated later work.
    token = mark_lineage(event.feedback_id, event.scope)
    try:
        headers = {"Nats-Msg-Id": event.event_id}
        # In the headers ourselves: FastStream sends baggage only from inside a consumer, so an event
        # published from the registry's HTTP API or its sweep reached the next service without it.
        _BAGGAGE.inject(headers)
        await broker.publish(event.model_dump(mode="json"), subject_for(event), headers=headers, stream=_stream_of(event),
                             timeout=PUBLISH_ACK_TIMEOUT_S)
    finally:
        otel_context.detach(token)


_BAGGAGE = W3CBaggagePropagator()
INSUFFICIENT_STORAGE = 10047  # JetStream: "insufficient storage resources available"


def _stream_of(event: ev.Event) -> str:
    subject = subject_for(event)
    for spec in STREAMS:
        if any(subject.startswith(s.rstrip(">")) for s in spec.subjects):
            return spec.name
    raise LookupError(f"no stream holds subject {subject}")


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
        try:
            if isinstance(headers, dict) and "traceparent" not in headers:
                lineage = lineage_of(getattr(msg, "body", b""))
                if lineage:
                    headers["traceparent"] = root_traceparent(*lineage)
        except Exception:  # noqa: BLE001 - before the dead-letter middleware: a hostile body must reach it
            log.warning("no trace root for a message on %s", getattr(msg, "subject", "?"), exc_info=True)
        return await call_next(msg)


# Work of this process that ran past its limit (kept_in_progress), described: while there is any,
# the service reports itself not alive (shared.runtime.service_app), and is restarted.
overdue_work: set[str] = set()


@dataclasses.dataclass
class _WorkClock:
    started: float


# The clock of the message whose work this task (or a worker thread it started: asyncio.to_thread
# copies the context) is doing, inside kept_in_progress.
_work_clock: contextvars.ContextVar[_WorkClock | None] = contextvars.ContextVar("seal_work_clock", default=None)


def work_begins() -> None:
    """The current message's work begins now: its limit (``at_most_s`` of :func:`kept_in_progress`)
    counts from here. For work that first waits its turn (the trainer trains one job at a time, and
    a replica holds a message of each of its consumers): a message that waited an hour for the one
    before it is not hung. Safe to call from a worker thread, and outside any message's work."""
    clock = _work_clock.get()
    if clock is not None:
        clock.started = time.monotonic()


@contextlib.asynccontextmanager
async def kept_in_progress(message: Any, every_s: float, at_most_s: float | None = None) -> AsyncIterator[None]:
    """Tell JetStream every ``every_s`` seconds that ``message`` is still being worked on.

    For handlers that run longer than the consumer's ack wait (generation,
    training, evaluation), so the message is not redelivered meanwhile. The
    beat stops on a flag as well as on cancellation: nats-py swallows a
    cancellation that lands inside a publish, which would leave it running.

    Past ``at_most_s`` the work counts as hung (a worker thread that never returns): the beat
    stops, so JetStream hands the message to another replica after its ack wait (and to the dead
    letters after its last delivery), and the service reports itself not alive until the work ends.
    """
    done = asyncio.Event()
    clock = _WorkClock(time.monotonic())
    token = _work_clock.set(clock)
    what = f"message [{described(message)}] (work {id(message):x})"

    async def beat() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), every_s)
                return
            if at_most_s is not None and time.monotonic() - clock.started > at_most_s:
                log.error("still working on %s after %.0f s (the limit is %.0f s): no longer holding it; it goes to "
                          "another replica after its ack wait, and this service reports itself not alive",
                          what, time.monotonic() - clock.started, at_most_s)
                overdue_work.add(what)
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
        _work_clock.reset(token)
        if what in overdue_work:
            log.warning("%s ended after %.0f s, past its limit", what, time.monotonic() - clock.started)
            overdue_work.discard(what)

