"""A message as JetStream hands it to the middleware, without a server: for the broker's unit tests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from faststream import ContextRepo

from shared.dead_letters import DeadLetterMiddleware


def jetstream_message(
    delivered: int, consumer: str, subject: str = "seal.events.feedback.submitted", body: bytes = b"{}",
    stream: str = "SEAL_EVENTS", sequence: int = 42,
) -> SimpleNamespace:
    """What the middleware reads of a message: its body, subject, headers and delivery metadata."""
    metadata = SimpleNamespace(num_delivered=delivered, consumer=consumer, stream=stream, sequence=SimpleNamespace(stream=sequence))
    return SimpleNamespace(body=body, raw_message=SimpleNamespace(subject=subject, headers={"Nats-Msg-Id": "x"}, metadata=metadata))


def dead_letter_middleware(service: str, msg: Any, broker: Any = None) -> DeadLetterMiddleware:
    """The service's dead-letter middleware around ``msg``, publishing through ``broker``."""
    context = ContextRepo()
    if broker is not None:
        context.set_global("broker", broker)
    return DeadLetterMiddleware.for_service(service)(msg, context=context)
