"""Handling one ``feedback.submitted`` message: plain functions over ports.

:func:`handle_feedback` takes the raw payload (so that a malformed one can
still be answered) and the ports; it publishes what it decided and returns
it. No FastStream here: :mod:`.app` only feeds messages in.

* Malformed feedback: ``feedback.rejected`` (when the envelope says whose
  it was), then :class:`~shared.dead_letters.PermanentFailure`: the message is
  dead-lettered and terminated, never redelivered.
* Feedback that must not be learned (PII, secrets, injection, blocked
  terms): ``feedback.rejected``, and the message is acknowledged.
* Otherwise: one ``selfedit.generated`` or ``selfedit.rejected`` per candidate.

Idempotent: the ledger records each handled feedback id; a redelivery
produces nothing new (see :mod:`.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import context, trace

from services.generator.candidates import (
    candidate_events,
    feedback_seed,
    feedback_sequences,
    passage_chunk_chars,
    plan_candidates,
    untrainable,
)
from services.generator.feedback import MalformedFeedback, parse_feedback
from services.generator.prompts import Prompt
from services.generator.screening import screen_feedback
from services.generator.settings import GeneratorConfig
from services.generator.state import LedgerEntry
from services.generator.validation import Limits
from services.generator.writer import Written
from shared.dead_letters import PermanentFailure
from shared.events import Event, FeedbackRejected, FeedbackSubmitted, SelfEditGenerated, SelfEditRejected
from shared.registry_view import PolicyAdapterRef, ScopePolicy
from shared.shutdown import Interrupted
from shared.telemetry import mark_lineage

log = logging.getLogger(__name__)


class ScopeState(Protocol):
    async def scope_policy(self, scope: str) -> ScopePolicy: ...

    async def policy_adapter(self, scope: str) -> PolicyAdapterRef | None: ...


class Ledger(Protocol):
    async def recall(self, scope: str, feedback_id: str) -> LedgerEntry | None: ...

    async def record(self, scope: str, feedback_id: str, entry: LedgerEntry) -> None: ...

    async def claim(self, scope: str, feedback_id: str, event_id: str, stale_after_s: float) -> LedgerEntry | None: ...

    async def release(self, scope: str, feedback_id: str, event_id: str) -> None: ...

    async def record_written(self, scope: str, feedback_id: str, writer: str, entry: LedgerEntry) -> bool: ...


class Writer(Protocol):
    def write(self, prompts: Sequence[Prompt], *, seed: int, adapter: PolicyAdapterRef | None = None) -> Written: ...


@dataclass
class GeneratorPorts:
    scope_state: ScopeState
    ledger: Ledger
    writer: Writer
    publish: Callable[[Event], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    feedback_id: str
    events: tuple[Event, ...]
    duplicate: bool = False

    @property
    def generated(self) -> int:
        return sum(isinstance(e, SelfEditGenerated) for e in self.events)

    @property
    def rejected(self) -> int:
        return sum(isinstance(e, (SelfEditRejected, FeedbackRejected)) for e in self.events)


async def handle_feedback(
    payload: bytes | str | dict[str, Any], ports: GeneratorPorts, config: GeneratorConfig, delivery: str | None = None
) -> Outcome:
    """``delivery``: what tells this message from another message of the same feedback (its stream
    sequence), so that two messages of one feedback id (a product that published it twice) never
    take one claim as their own; redeliveries of one message share it. Default: the event id."""
    try:
        feedback = parse_feedback(payload)
    except MalformedFeedback as exc:
        if exc.rejection is not None:
            await ports.publish(exc.rejection)
        raise PermanentFailure(f"malformed feedback: {exc.reason}") from None
    token = mark_lineage(feedback.feedback_id, feedback.scope)
    writer = f"{feedback.event_id}@{delivery}" if delivery else feedback.event_id
    try:
        return await _handle_once(feedback, ports, config, writer)
    finally:
        context.detach(token)  # type: ignore[arg-type]


async def _handle_once(feedback: FeedbackSubmitted, ports: GeneratorPorts, config: GeneratorConfig, writer: str) -> Outcome:
    entry = await ports.ledger.recall(feedback.scope, feedback.feedback_id)
    if entry is None or entry.status == "writing":
        entry = await _claim(feedback, ports, config, writer)
    if entry is not None and entry.status == "done":
        log.info("feedback %s was already handled (%d events); nothing to do", feedback.feedback_id, len(entry.event_ids))
        return Outcome(feedback.feedback_id, (), duplicate=True)
    if entry is not None and entry.events:
        log.info("feedback %s was handled but maybe not published; republishing its events", feedback.feedback_id)
        events = list(entry.events)
    elif entry is not None and entry.status == "pending":
        events = await _write_again(feedback, ports, config, entry)
    else:
        keeping = asyncio.create_task(_keep_claim(feedback, ports, config, writer), name="claim-beat")
        try:
            events = await write_self_edits(feedback, ports, config)
        except BaseException:
            # Handed back (a transient failure, a shutdown): another delivery waiting for this one
            # must not wait until the claim goes stale; on one replica it would hold the only slot.
            keeping.cancel()
            with contextlib.suppress(Exception):
                await ports.ledger.release(feedback.scope, feedback.feedback_id, writer)
            raise
        keeping.cancel()
        if not await ports.ledger.record_written(feedback.scope, feedback.feedback_id, writer, LedgerEntry.pending(events)):
            # Another delivery took the claim over (this one's renewals failed): its writing stands,
            # and publishing this one's too would send two sets of candidates for one feedback.
            log.warning("feedback %s: the claim went to another delivery while this one wrote; its writing stands",
                        feedback.feedback_id)
            return Outcome(feedback.feedback_id, (), duplicate=True)
    for event in events:
        await ports.publish(event)
    await ports.ledger.record(feedback.scope, feedback.feedback_id, LedgerEntry.done(events))
    outcome = Outcome(feedback.feedback_id, tuple(events))
    span = trace.get_current_span()
    span.set_attribute("seal.generator.generated", outcome.generated)
    span.set_attribute("seal.generator.rejected", outcome.rejected)
    return outcome


async def _write_again(feedback: FeedbackSubmitted, ports: GeneratorPorts, config: GeneratorConfig, entry: LedgerEntry) -> list[Event]:
    """The events of a writing recorded by their ids alone (too large to keep in the ledger) whose
    publishing did not finish: written again. Their ids derive from the feedback and the candidate,
    and the sampling is seeded, so the same events come out; only those recorded are sent, so that
    a policy changed meanwhile cannot add a second outcome to the one already partly sent."""
    log.info("feedback %s was handled but maybe not published, its events not kept; writing them again", feedback.feedback_id)
    events = await write_self_edits(feedback, ports, config)
    recorded = set(entry.event_ids)
    same = [e for e in events if e.event_id in recorded]
    if len(same) != len(recorded):
        log.warning("feedback %s: written again, %d of its %d recorded events came out (the scope's policy changed?); "
                    "sending those, the registry's decision timeout covers the rest",
                    feedback.feedback_id, len(same), len(recorded))
    return same


async def _claim(feedback: FeedbackSubmitted, ports: GeneratorPorts, config: GeneratorConfig, writer: str) -> LedgerEntry | None:
    """Wait while another delivery of this feedback writes it (a product that published it again,
    under a new event id, taken by another replica): two writings would be two sets of candidates
    under different ids. None: this delivery writes; else what the other one wrote."""
    waited = False
    stopping = getattr(ports.writer, "stopping", None)

    def check() -> None:  # before each KV call: the process may be shutting down, its connection closing
        if stopping is not None and stopping.is_set():
            raise Interrupted(f"stopped while waiting for feedback {feedback.feedback_id} to be written by another delivery")

    while True:
        check()
        standing = await ports.ledger.claim(feedback.scope, feedback.feedback_id, writer, config.claim_stale_s)
        if standing is None or standing.status != "writing":
            return standing
        if not waited:
            log.info("feedback %s is being written for its delivery %s; waiting for it", feedback.feedback_id, standing.writer)
            waited = True
        waited_s = 0.0
        while waited_s < config.claim_poll_s:  # in short steps, so that a shutdown is seen at once
            check()
            step = min(0.5, config.claim_poll_s - waited_s)
            await asyncio.sleep(step)
            waited_s += step


async def _keep_claim(feedback: FeedbackSubmitted, ports: GeneratorPorts, config: GeneratorConfig, writer: str) -> None:
    """Renew this delivery's claim while it writes (a third of ``claim_stale_s`` apart), so that
    a long writing is not taken for a dead one."""
    while True:
        await asyncio.sleep(config.claim_stale_s / 3)
        try:
            await ports.ledger.claim(feedback.scope, feedback.feedback_id, writer, config.claim_stale_s)
        except Exception as exc:  # noqa: BLE001 - a missed renewal only risks a second writing
            log.warning("could not renew the claim on feedback %s: %s", feedback.feedback_id, exc)


async def write_self_edits(feedback: FeedbackSubmitted, ports: GeneratorPorts, config: GeneratorConfig) -> list[Event]:
    """The events one feedback deserves: a rejection, or one event per candidate."""
    policy = await ports.scope_state.scope_policy(feedback.scope)
    # In a thread: a megabyte of hostile text takes the patterns a second or two, and the loop beats meanwhile.
    problems = await asyncio.to_thread(screen_feedback, feedback.content, policy.blocklist)
    chunk = passage_chunk_chars(config, policy)
    own = feedback_sequences(feedback, Limits(config.max_sequences, config.max_sequence_chars, passage_chars=chunk))
    problems.extend(untrainable(feedback, chunk))
    if len(own) > config.max_sequences:
        problems.append(
            f"is too long to train on: it needs {len(own)} sequences of at most {chunk} "
            f"characters, more than the limit of {config.max_sequences}"
        )
    elif (size := encoded_size(own)) > MAX_OWN_SEQUENCE_BYTES:
        problems.append(f"would make self-edit events too large to send: its own training text alone is {size} bytes "
                        f"as JSON, more than {MAX_OWN_SEQUENCE_BYTES} (a long title is repeated in every piece of "
                        "a long passage; text outside ASCII takes up to 12 bytes a character)")
    if problems:
        return [feedback.caused(FeedbackRejected, reason="the feedback " + "; ".join(problems))]
    seed = feedback_seed(feedback.feedback_id)
    plans = plan_candidates(feedback, policy, seed)
    adapter = await ports.scope_state.policy_adapter(feedback.scope)
    written = await asyncio.to_thread(ports.writer.write, [p.prompt for p in plans], seed=seed, adapter=adapter)
    # Parsing and the probes' rule-written questions are pure Python, seconds on a long passage:
    # off the event loop, which keeps the in-progress beats and the health checks answering.
    events = await asyncio.to_thread(candidate_events, feedback, policy, plans, written.completions, config, written.adapter_id)
    largest = max((encoded_size(e.model_dump(mode="json")) for e in events), default=0)
    if largest > MAX_EVENT_BYTES:
        # Published, it would fail on every delivery (the server refuses it) and end in the dead
        # letters with the product never told.
        return [feedback.caused(FeedbackRejected, reason=f"the feedback's self-edit events would be up to {largest} "
                                f"bytes, more than a message may carry ({MAX_EVENT_BYTES}); send a shorter passage")]
    return events


# nats-server's default max_payload is 1 MiB: an event stays below it with room for the headers. The
# feedback's own sequences go into every candidate's event, with the completions and probes besides.
MAX_EVENT_BYTES = 1_000_000
MAX_OWN_SEQUENCE_BYTES = 600_000


def encoded_size(value: object) -> int:
    """Bytes as JSON, escaped to ASCII: the most any JSON encoder the broker may use would send."""
    return len(json.dumps(value))
