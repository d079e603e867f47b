"""Reading an untrusted ``feedback.submitted`` payload.

The bus delivers bytes. A payload that is not a valid feedback event (not
JSON, an unknown feedback kind, content that breaks the schema) is answered
with a :class:`~shared.events.FeedbackRejected` whose reason a person can
read, as long as the envelope says whose feedback it was; the message itself
is then terminated (see :mod:`.handlers`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, get_args

from shared.events import (
    ID_PATTERN,
    SCOPE_PATTERN,
    EventValidationError,
    FeedbackContent,
    FeedbackRejected,
    FeedbackSubmitted,
    derived_id,
)

KNOWN_KINDS: tuple[str, ...] = tuple(
    cls.model_fields["kind"].default for cls in get_args(get_args(FeedbackContent)[0])
)


class MalformedFeedback(Exception):
    """The payload is not a feedback event this service can work on.

    ``rejection`` is the event to publish, or None when the payload does not
    even say which feedback and scope it belongs to.
    """

    def __init__(self, reason: str, rejection: FeedbackRejected | None):
        super().__init__(reason)
        self.reason = reason
        self.rejection = rejection


def parse_feedback(payload: bytes | str | dict[str, Any]) -> FeedbackSubmitted:
    """A validated feedback event, or :class:`MalformedFeedback` with a readable reason."""
    body = _as_object(payload)
    if body is None:
        raise MalformedFeedback("payload is not a JSON object", None)
    kind_problem = _kind_problem(body.get("content"))
    if kind_problem:
        raise MalformedFeedback(kind_problem, _rejection(body, payload, kind_problem))
    try:
        return FeedbackSubmitted.from_json(body)
    except EventValidationError as exc:
        raise MalformedFeedback(exc.reason, _rejection(body, payload, exc.reason)) from None


def _as_object(payload: bytes | str | dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(payload, dict):
        return payload
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        return None
    return body if isinstance(body, dict) else None


def _kind_problem(content: Any) -> str | None:
    expected = ", ".join(KNOWN_KINDS)
    if content is None:
        return f"feedback has no content; expected an object with a kind ({expected})"
    if not isinstance(content, dict):
        return f"feedback content must be an object with a kind ({expected})"
    kind = content.get("kind")
    if kind is None:
        return f"feedback content has no kind; expected one of {expected}"
    if kind not in KNOWN_KINDS:
        return f"unknown feedback kind {str(kind)[:64]!r}; expected one of {expected}"
    return None


def _rejection(body: dict[str, Any], payload: Any, reason: str) -> FeedbackRejected | None:
    """A rejection for the sender, when the envelope names a valid feedback id and scope."""
    feedback_id, scope = body.get("feedback_id"), body.get("scope")
    if not (_matches(ID_PATTERN, feedback_id) and _matches(SCOPE_PATTERN, scope)):
        return None
    cause = body.get("event_id")
    cause = cause if _matches(ID_PATTERN, cause) else None
    # The same bad payload always yields the same rejection id (deduplicated on the bus).
    basis = cause or hashlib.sha256(_as_bytes(payload)).hexdigest()
    return FeedbackRejected(
        event_id=derived_id(scope, feedback_id, basis, FeedbackRejected.model_fields["type"].default, ""),
        feedback_id=feedback_id,
        scope=scope,
        causation_id=cause,
        reason=reason,
    )


def _matches(pattern: str, value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _as_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload, sort_keys=True, default=str).encode()
