"""Running a service process: logging, health and readiness endpoints, serving.

Every service is an ASGI app (``AsgiFastStream``) so Kubernetes can probe it:

* ``GET /healthz``: liveness; 204 while the service's NATS connections are
  usable (connected, or reconnecting while NATS is away, up to a bound: a
  restart would not bring NATS back, and it would end a training in
  progress) and its own liveness check passes (the evaluator: its base model
  is not left contaminated by an adapter it could not take off), 500
  otherwise: a connection closed, or no longer trying, takes nothing more
  until the process restarts (:func:`shared.connections.nats_trouble`), nor does a
  service whose durable consumers JetStream says are gone
  (:func:`shared.broker.missing_consumers`).
* ``GET /readyz``: readiness; 200 once the service's own check passes (for
  example: the base model is loaded and the object store answers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.nats import NatsBroker
from opentelemetry import baggage

from shared.broker import bus_trouble, overdue_work, reconcile_consumers
from shared.connections import connect_broker
from shared.settings import ServiceSettings
from shared.telemetry import FEEDBACK_ID, current_trace_id

# ``lineage``: " [feedback=... trace=...]" where the line was logged in a feedback's work, else empty.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(lineage)s: %(message)s"


class LineageFilter(logging.Filter):
    """Ties every log line to the feedback and the trace it was logged in.

    Sets ``lineage`` (for :data:`LOG_FORMAT`), and ``feedback_id`` and ``trace_id`` where the record
    does not carry them already: a record's own ``feedback_id`` (the dead-letter logs name the message's,
    :mod:`shared.dead_letters`), else the one in the OpenTelemetry baggage
    (:func:`shared.telemetry.mark_lineage`); the trace is the active span's, which the registry stores
    with each feedback. A line logged outside any feedback's work is left as it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if getattr(record, "feedback_id", None) is None:
                found = baggage.get_baggage(FEEDBACK_ID)
                record.feedback_id = found if isinstance(found, str) and found else None
            if getattr(record, "trace_id", None) is None:
                record.trace_id = current_trace_id()
        except Exception:  # noqa: BLE001 - a log line is never lost to its decoration
            record.feedback_id = getattr(record, "feedback_id", None)
            record.trace_id = getattr(record, "trace_id", None)
        parts = [f"{label}={_word(value)}" for label, value in
                 (("feedback", record.feedback_id), ("trace", record.trace_id)) if value]
        record.lineage = f" [{' '.join(parts)}]" if parts else ""
        return True


def _word(value: object) -> str:
    """One word of the line: a feedback id read from a message body is quoted where it would break it."""
    text = str(value)
    return text if text.isprintable() and not any(c.isspace() or c in "[]" for c in text) else ascii(text[:200])


def log_handler(stream: Any = None) -> logging.Handler:
    """A handler writing :data:`LOG_FORMAT` lines, each with its feedback and trace (:class:`LineageFilter`);
    an exception logged with ``exc_info`` comes with its traceback."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(LineageFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[log_handler()])


def service_app(
    broker: NatsBroker,
    *,
    ready: Callable[[], bool] = lambda: True,
    alive: Callable[[], bool] = lambda: True,
    on_startup: Sequence[Callable[..., Any]] = (),
    after_startup: Sequence[Callable[..., Any]] = (),
    on_shutdown: Sequence[Callable[..., Any]] = (),
    after_shutdown: Sequence[Callable[..., Any]] = (),
    routes: Sequence[tuple[str, Any]] = (),
    connections: Callable[[], Iterable[Any]] = tuple,
) -> AsgiFastStream:
    """The service as an ASGI app with /healthz and /readyz. ``on_shutdown`` runs before the broker
    drains its handlers (tell work in progress to stop there), ``after_shutdown`` once they are done
    (close there what a handler still uses on its way out: its own NATS connection, say).
    ``connections``: the service's own NATS connections besides the broker's, for /healthz."""
    @get
    async def readyz(scope: Any) -> AsgiResponse:
        ok = _holds(ready)
        return AsgiResponse(b"ready" if ok else b"not ready", status_code=200 if ok else 503)

    @get
    async def healthz(scope: Any) -> AsgiResponse:
        if not _holds(alive):
            # A worker pod sits behind no Service: NotReady would not stop it taking messages it can
            # only fail. Liveness failing restarts it.
            return AsgiResponse(b"broken", status_code=500)
        if overdue_work:  # a handler past its work limit: hung, and its replica takes nothing else
            return AsgiResponse(f"hung: {sorted(overdue_work)[0]}"[:500].encode(), status_code=500)
        if trouble := await bus_trouble(broker, *connections()):
            return AsgiResponse(trouble[:500].encode(), status_code=500)
        return AsgiResponse(b"", 204)

    async def connected() -> None:  # first: a NATS that cannot be reached is said, not waited for
        await connect_broker(broker)

    async def consumers_as_configured() -> None:
        await reconcile_consumers(broker)

    return AsgiFastStream(
        broker,
        asgi_routes=[("/healthz", healthz), ("/readyz", readyz), *routes],
        on_startup=[connected, *on_startup],
        after_startup=[consumers_as_configured, *after_startup],
        on_shutdown=on_shutdown,
        after_shutdown=after_shutdown,
    )


def _holds(check: Callable[[], bool]) -> bool:
    """A service's own check; one that fails counts as not holding."""
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a failing check means "not ready" / "not alive"
        return False


def serve(app: AsgiFastStream, settings: ServiceSettings) -> None:
    """Run until SIGTERM/SIGINT; FastStream drains in-flight messages on the way out."""
    import uvicorn

    configure_logging(settings.log_level)
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level.lower())
