"""Dead letters for operators: see what was given up on and why, and replay one once its cause is fixed.

A message lands in ``SEAL_DLQ`` (``seal.dlq.<service>.<original subject>``, the reason in its
headers) when a service rejected it as invalid, failed on it through every delivery, or never
answered it. Most causes are outside the message: an S3 or NATS outage longer than the retries,
a model that did not load, a bug since fixed. Replaying publishes the original event to its
subject again, for every consumer of that subject (their handlers are idempotent: a consumer that
handled it already does nothing new), records who replayed it and why in the audit stream, and
removes the dead letter. A dead letter whose body is no valid event is not replayed: it would
fail the same way. Nor, unless forced, is a step of a feedback's pipeline once the feedback is
decided (a decision timeout, typically, while the step sat here): what it leads to would be a
candidate the registry no longer considers (``Operations.dead_letter_replay``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from shared import events as ev
from shared.dead_letters import REASON_HEADER, SERVICE_HEADER, TRUNCATED_HEADER, header_text
from shared.subjects import DLQ_PREFIX, DLQ_STREAM, EVENTS_STREAM

from .ports import NotFound, Refused

log = logging.getLogger(__name__)

DEAD_LETTER_LIST_LIMIT = 20
DEAD_LETTER_LIST_MAX = 200
SERVICE_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
MAX_SEQUENCE = 2**63 - 1  # a stream sequence is a uint64; past this the server refuses the request
# Dead letters read to fill a listing of all services, newest first; replayed ones leave gaps.
SCAN_MAX = 2000
# The widest window of sequences one service's listing reads per step, from the newest back (it
# starts at max(64, 2 x limit) and doubles).
SERVICE_WINDOW = 2000
EVENT_SUBJECTS = "seal.events."
REPLAYED_FROM_HEADER = "Seal-Replayed-From"


class DeadLetters:
    """The dead-letter stream, over a JetStream context (the registry's connection)."""

    def __init__(self, js: Callable[[], JetStreamContext], publish: Callable[[ev.Event], Awaitable[None]]):
        self._js = js
        self._publish = publish

    async def latest(self, service: str | None = None, limit: int = DEAD_LETTER_LIST_LIMIT) -> list[dict[str, Any]]:
        """The newest dead letters first, of one service or of all."""
        js = self._js()
        try:
            state = (await js.stream_info(DLQ_STREAM)).state
        except NotFoundError:
            return []
        if service is not None:
            return await self._latest_of(js, service, limit, max(state.first_seq, 1), state.last_seq)
        found: list[dict[str, Any]] = []
        sequence, scanned = state.last_seq, 0
        while sequence >= max(state.first_seq, 1) and len(found) < limit and scanned < SCAN_MAX:
            try:
                entry = describe(await js.get_msg(DLQ_STREAM, sequence))
            except NotFoundError:  # replayed (removed) or aged out
                entry = None
            if entry is not None and service in (None, entry["service"]):
                found.append(entry)
            sequence -= 1
            scanned += 1
        return found

    async def replay(
        self, sequence: int, operator: str, reason: str, check: Callable[[ev.Event], Awaitable[None]] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Publish dead letter ``sequence`` to its original subject again, audit it, remove it;
        ``check`` may refuse the event first (raising)."""
        js = self._js()
        try:
            message = await js.get_msg(DLQ_STREAM, sequence)
        except NotFoundError:
            raise NotFound(f"no dead letter {sequence} in {DLQ_STREAM}: replayed already (perhaps by an earlier try of "
                           "this request), or past its retention") from None
        entry = describe(message)
        if not entry["subject"].startswith(EVENT_SUBJECTS):
            raise Refused(f"dead letter {sequence} came from {entry['subject']!r}, not from an event subject; "
                          "it is not replayed")
        if truncated := _headers(message).get(TRUNCATED_HEADER):
            raise Refused(f"dead letter {sequence} kept no copy of its message ({truncated}); "
                          "publish it again from there once the cause is fixed"[:600])
        try:
            event = ev.parse_event(message.data or b"")
        except ev.EventValidationError as exc:
            raise Refused(f"dead letter {sequence} is no valid event, and would fail again: {exc.reason}"[:600]) from None
        if check is not None:
            await check(event)
        headers = {k: v for k, v in _headers(message).items()
                   if k not in (REASON_HEADER, SERVICE_HEADER) and not k.startswith("Nats-")}
        headers[REPLAYED_FROM_HEADER] = f"{DLQ_STREAM}/{sequence}"
        # Its own message id: the original's may still be in the stream's duplicate window, and a
        # retried replay of the same dead letter is stored once.
        headers["Nats-Msg-Id"] = f"replay-{DLQ_STREAM}-{sequence}"
        await js.publish(entry["subject"], message.data or b"", headers=headers, stream=EVENTS_STREAM)
        await self._publish(
            ev.OperatorAction(
                # Per request: two operators replaying one dead letter are both audited (one event goes out).
                event_id=ev.derived_id("operator", ("dead-letter", sequence, request_id), "replay"),
                feedback_id=event.feedback_id,
                scope=event.scope,
                causation_id=event.event_id,
                action="replay",
                operator=operator,
                reason=f"{reason} (dead letter {sequence} of the {entry['service']}: {event.type} {event.event_id} "
                       f"to {entry['subject']})"[:2000],
            )
        )
        try:
            await js.delete_msg(DLQ_STREAM, sequence)
        except APIError as exc:
            # Gone already (JSSequenceNotFound, JSStreamMsgDeleteFailed): a concurrent replay of the
            # same dead letter removed it; the event went out once (the same message id).
            if not isinstance(exc, NotFoundError) and exc.err_code not in (10043, 10057):
                raise
        log.info("dead letter %d (%s, %s) replayed to %s by %s: %s",
                 sequence, entry["event_type"], entry["reason"][:200], entry["subject"], operator, reason)
        return {**entry, "replayed_to": entry["subject"]}


    async def _latest_of(self, js: JetStreamContext, service: str, limit: int, first: int, last: int) -> list[dict[str, Any]]:
        """One service's newest dead letters, however many of other services' came after them: the
        server picks the service's subjects (``next_by_subj``), a window of sequences at a time from
        the newest back, so a flood of one service's letters hides no other's."""
        subject = f"{DLQ_PREFIX}.{service}.>"
        try:  # the service's oldest letter: below it there is nothing of the service's to read
            first = (await js.get_msg(DLQ_STREAM, seq=first, subject=subject, next=True)).seq or first
        except NotFoundError:
            return []
        found: list[dict[str, Any]] = []
        high, window_size = last, min(SERVICE_WINDOW, max(64, 2 * limit))
        while high >= first and len(found) < limit:
            low = max(first, high - window_size + 1)
            window_size = min(SERVICE_WINDOW, window_size * 2)  # few of the service's near the top: look wider
            window: list[dict[str, Any]] = []
            sequence = low
            while sequence <= high:
                try:
                    message = await js.get_msg(DLQ_STREAM, seq=sequence, subject=subject, next=True)
                except NotFoundError:  # none of the service's at or after it
                    break
                if message.seq is None or message.seq > high:
                    break
                window.append(describe(message))
                sequence = message.seq + 1
            found.extend(reversed(window))
            high = low - 1
        return found[:limit]


def describe(message: RawStreamMsg) -> dict[str, Any]:
    """What an operator needs to judge a dead letter: when, from where, why, and which event."""
    rest = (message.subject or "").removeprefix(f"{DLQ_PREFIX}.")
    service, _, subject = rest.partition(".")
    headers = _headers(message)
    body = _object(message.data)
    return {
        "sequence": message.seq,
        "at": message.time.isoformat() if message.time else None,
        "service": headers.get(SERVICE_HEADER, service),
        "subject": subject,
        "reason": headers.get(REASON_HEADER, ""),
        "event_type": _text(body.get("type")),
        "event_id": _text(body.get("event_id")),
        "feedback_id": _text(body.get("feedback_id")),
        "scope": _text(body.get("scope")),
        "bytes": len(message.data or b""),
    }


def _headers(message: RawStreamMsg) -> dict[str, str]:
    """The headers as text: nats-py hands a value with non-ASCII characters over as an
    ``email.header.Header``, which is no string (a reason quoting a product's text)."""
    return {str(k): header_text(v) for k, v in (message.headers or {}).items()}


def _object(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data or b"")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None
