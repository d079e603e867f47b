"""OpenTelemetry setup and the lineage attributes every span carries.

Traces are always *created* (so every event has a trace id the registry can
store); they are *exported* over OTLP/HTTP only when an endpoint is set.
FastStream's NATS middleware (see :mod:`shared.broker`) carries W3C trace
context in message headers, so one feedback event is one trace across all
four services. Where no context came with it (a product publishing on the
bus without a ``traceparent``; the registry deciding from its sweep or an
operator's command) the trace is the feedback's own root,
:func:`feedback_context`: its trace id derives from the scope and the feedback id, so every
service, redelivery and later decision lands in the same trace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import baggage, context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from shared.settings import TelemetrySettings

log = logging.getLogger(__name__)

FEEDBACK_ID = "seal.feedback_id"
SCOPE = "seal.scope"
_ROOTS = uuid.UUID("5d3b8f0e-6a51-4c1e-9a57-2f1f3c7e0b11")


def feedback_root(feedback_id: str, scope: str = "") -> tuple[str, str]:
    """(trace id, parent span id) in hex for a feedback that came without trace context.

    From the scope and the feedback id together: products choose their own ids, and "fb-1" of one
    scope is another feedback than "fb-1" of the next, with a trace (and a sampling) of its own.

    Every bit comes from a hash: a UUID's fixed version and variant bits (uuid5, as before) put
    every trace id's low 64 bits above half their range, where the ratio sampler reads them, so a
    sample ratio under 0.5 kept no feedback at all."""
    digest = hashlib.sha256(f"{_ROOTS}:{scope}:{feedback_id}".encode()).hexdigest()
    return digest[:32], digest[32:48]


def root_traceparent(feedback_id: str, scope: str = "") -> str:
    """A W3C ``traceparent`` header under the feedback's own root (sampled)."""
    trace_id, span_id = feedback_root(feedback_id, scope)
    return f"00-{trace_id}-{span_id}-01"


def lineage_of(body: Any) -> tuple[str, str] | None:
    """(feedback id, scope) a raw event body (JSON) names (the scope "" where it names none), or None."""
    try:
        parsed = json.loads(body)
        value, scope = parsed.get("feedback_id"), parsed.get("scope")
    except (ValueError, TypeError, AttributeError, RecursionError):  # RecursionError: JSON nested thousands deep
        return None
    if not isinstance(value, str) or not value:
        return None
    scope = scope if isinstance(scope, str) else ""
    try:  # a lone surrogate ("\ud800") is valid JSON but no UTF-8: such an id names no trace
        value.encode(), scope.encode()
    except UnicodeEncodeError:
        return None
    return value, scope


def feedback_context(feedback_id: str, trace_id: str | None = None, scope: str = "") -> context.Context:
    """A context whose parent is the feedback's trace: ``trace_id`` (hex) where it is known,
    else the feedback's own root (in ``scope``). Spans started in it join that trace."""
    root_trace, root_span = feedback_root(feedback_id, scope)
    try:
        tid = int(trace_id, 16) if trace_id else 0
    except ValueError:
        tid = 0
    parent = SpanContext(
        trace_id=tid or int(root_trace, 16), span_id=int(root_span, 16), is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def setup_tracing(
    settings: TelemetrySettings,
    service_name: str,
    extra_processors: Iterable[SpanProcessor] = (),
) -> TracerProvider:
    """Build this process's tracer provider. It is returned, not made global,
    so tests can run several services in one process with their own exporters."""
    resource = Resource.create(
        {"service.name": service_name, "service.namespace": settings.service_namespace}
    )
    # A feedback's trace arrives as a remote, sampled parent (every service builds the same root
    # for a feedback, flagged sampled); the ratio applies to it too, decided by the trace id, so
    # every service keeps or drops the same feedback's spans. (ParentBased alone followed the flag,
    # and the ratio never applied to a feedback.)
    by_trace_id = TraceIdRatioBased(settings.sample_ratio)
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(by_trace_id, remote_parent_sampled=by_trace_id)
    )
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("exporting traces to %s", without_credentials(endpoint))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider


def without_credentials(url: str) -> str:
    """``url`` as it may be logged: a user and password in it (``https://user:token@host``) left out."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def current_trace_id() -> str | None:
    """The hex trace id of the active span, or None outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def mark_lineage(feedback_id: str, scope: str) -> object:
    """Put the lineage root on the active span and in baggage.

    Returns a token for :func:`opentelemetry.context.detach`.
    """
    span = trace.get_current_span()
    span.set_attribute(FEEDBACK_ID, feedback_id)
    span.set_attribute(SCOPE, scope)
    ctx = baggage.set_baggage(FEEDBACK_ID, feedback_id)
    ctx = baggage.set_baggage(SCOPE, scope, context=ctx)
    return context.attach(ctx)
