"""Running a service process: logging, health and readiness endpoints, serving.

Every service is an ASGI app (``AsgiFastStream``) so Kubernetes can probe it:

* ``GET /healthz``: liveness; 204 while the broker answers a ping and the
  service's own liveness check passes (the evaluator: its base model is not
  left contaminated by an adapter it could not take off), 500 otherwise.
* ``GET /readyz``: readiness; 200 once the service's own check passes (for
  example: the base model is loaded and the object store answers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.nats import NatsBroker

from shared.broker import reconcile_consumers
from shared.settings import ServiceSettings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
) -> AsgiFastStream:
    """The service as an ASGI app with /healthz and /readyz. ``on_shutdown`` runs before the broker
    drains its handlers (tell work in progress to stop there), ``after_shutdown`` once they are done
    (close there what a handler still uses on its way out: its own NATS connection, say)."""
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
        return AsgiResponse(b"", 204) if await broker.ping(5.0) else AsgiResponse(b"", 500)  # as make_ping_asgi

    async def consumers_as_configured() -> None:
        await reconcile_consumers(broker)

    return AsgiFastStream(
        broker,
        asgi_routes=[("/healthz", healthz), ("/readyz", readyz), *routes],
        on_startup=on_startup,
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
