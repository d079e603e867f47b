"""The registry's queries and actions, as both interfaces (HTTP, NATS request-reply) expose them.

Request bodies are pydantic models, so both interfaces validate the same way
and an operator always has to say who they are and why.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from shared import events as ev
from shared.registry_view import ScopePolicy, UnreadableRecord

from . import actions, intake, queries
from .ledger import Ledger
from .ports import Busy, InvalidRequest, Refused
from .records import FEEDBACK_LIST_LIMIT, SCOPE_LIST_LIMIT, VERSION_LIST_LIMIT
from .redrive import DEAD_LETTER_LIST_LIMIT, DeadLetters


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The steps from a feedback to its decision: replayed after the decision, their outcome is not considered.
PIPELINE_EVENTS: tuple[type[ev.Event], ...] = (
    ev.FeedbackSubmitted, ev.SelfEditGenerated, ev.RebaseRequested, ev.AdapterTrained, ev.AdapterTrainingFailed,
    ev.AdapterEvaluated, ev.AdapterEvaluationFailed,
)


class OperatorRequest(Body):
    operator: ev.ShortText
    reason: ev.ShortText
    # The CLI sends one per invocation; a retried request is applied once.
    request_id: ev.Identifier = Field(default_factory=ev.new_id)


class ReplayRequest(OperatorRequest):
    # Replay a step of a feedback that is decided already (its outcome would not be considered).
    force: bool = False


class RollbackRequest(OperatorRequest):
    to_version: int = Field(ge=1)


class SubmitFeedback(Body):
    scope: ev.Scope
    content: ev.FeedbackContent
    submitted_by: ev.ShortText | None = None
    feedback_id: ev.Identifier | None = None


class AskRequest(Body):
    question: ev.ShortText
    max_new_tokens: int | None = Field(default=None, ge=1, le=512)


class Answerer(Protocol):
    async def answer(self, scope: str, question: str, max_new_tokens: int | None) -> dict[str, Any]: ...


class Unavailable(Exception):
    """What this registry cannot do as it runs (answering turned off, no NATS): a 503."""


class Operations:
    def __init__(
        self,
        ledger: Callable[[], Ledger],
        publish: Callable[[ev.Event], Awaitable[None]],
        answerer: Callable[[], Answerer | None] = lambda: None,
        dead_letters: Callable[[], DeadLetters | None] = lambda: None,
    ):
        self._ledger = ledger
        self._publish = publish
        self._answerer = answerer
        self._dead_letters = dead_letters

    @property
    def ledger(self) -> Ledger:
        return self._ledger()

    # ---------------------------------------------------------------- queries

    async def scopes(self, after: str | None = None, limit: int = SCOPE_LIST_LIMIT) -> list[dict[str, Any]]:
        return await queries.list_scopes(self.ledger, after, limit)

    async def versions(self, scope: str, limit: int = VERSION_LIST_LIMIT) -> list[dict[str, Any]]:
        return await queries.list_versions(self.ledger, scope, limit)

    async def lineage(self, scope: str, version: int) -> dict[str, Any]:
        return await queries.version_lineage(self.ledger, scope, version)

    async def feedback(self, feedback_id: str, scope: str | None = None) -> dict[str, Any]:
        return await queries.feedback_fate(self.ledger, feedback_id, scope)

    async def feedback_list(
        self, scope: str, state: str | None = None, limit: int = FEEDBACK_LIST_LIMIT
    ) -> list[dict[str, Any]]:
        return await queries.list_feedback(self.ledger, scope, state, limit)

    async def get_policy(self, scope: str) -> dict[str, Any]:
        return (await self.ledger.policy(scope)).model_dump(mode="json")

    # ---------------------------------------------------------------- actions

    async def submit(self, body: SubmitFeedback) -> dict[str, Any]:
        event = ev.FeedbackSubmitted(
            feedback_id=body.feedback_id or ev.new_id(),
            scope=body.scope,
            content=body.content,
            submitted_by=body.submitted_by,
        )
        duplicate = False
        if body.feedback_id:
            # A product retrying the same feedback id gets the same event id (its scope and id's), deduplicated.
            known = await self.ledger.records_of(body.feedback_id)
            taken = [r.scope for r in known if r.scope != body.scope]
            if taken:
                raise Refused(f"feedback id {body.feedback_id!r} is already used by scope {taken[0]!r}; "
                              "feedback ids are unique across the platform")
            digests = {r.content_digest for r in known if r.content_digest is not None}
            if digests and intake.content_digest(body.content) not in digests:
                raise Refused(f"feedback id {body.feedback_id!r} was already submitted with other content, which "
                              "stands; new feedback needs a new id")
            duplicate = bool(digests)
        await self._publish(event)
        return {"feedback_id": event.feedback_id, "event_id": event.event_id, "scope": event.scope, "duplicate": duplicate}

    async def approve(self, feedback_id: str, body: OperatorRequest, scope: str | None = None) -> dict[str, Any]:
        record = await actions.approve(self.ledger, feedback_id, body.operator, body.reason, scope)
        return await queries.feedback_fate(self.ledger, feedback_id, record.scope)

    async def reject(self, feedback_id: str, body: OperatorRequest, scope: str | None = None) -> dict[str, Any]:
        record = await actions.reject(self.ledger, feedback_id, body.operator, body.reason, scope)
        return await queries.feedback_fate(self.ledger, feedback_id, record.scope)

    async def rollback(self, scope: str, body: RollbackRequest) -> dict[str, Any]:
        head = await actions.rollback(self.ledger, scope, body.to_version, body.operator, body.reason, body.request_id)
        return {"scope": scope, **queries.head_summary(head)}

    async def pin(self, scope: str, body: OperatorRequest, pinned: bool = True) -> dict[str, Any]:
        head = await actions.set_pin(self.ledger, scope, pinned, body.operator, body.reason, body.request_id)
        return {"scope": scope, **queries.head_summary(head)}

    async def set_policy(
        self, scope: str, changes: dict[str, Any], operator: str, reason: str, replace: bool = False
    ) -> dict[str, Any]:
        """Merge ``changes`` into the scope's policy (validated as a whole), and audit who and why;
        ``replace`` starts from the defaults (and repairs a stored policy that no longer parses)."""
        unknown = sorted(set(changes) - set(ScopePolicy.model_fields))
        if unknown:
            # A misspelt key would otherwise be dropped in silence ("aproval=manual" leaving approval auto).
            raise InvalidRequest(
                f"unknown policy setting(s): {', '.join(unknown)}; the settings are: {', '.join(ScopePolicy.model_fields)}"
            )
        for name, value in changes.items():
            # Nested settings too: {"default_directives": {"epohcs": 5}} was dropped in silence.
            section = ScopePolicy.model_fields[name].annotation
            if isinstance(value, dict) and isinstance(section, type) and issubclass(section, BaseModel):
                if wrong := sorted(set(value) - set(section.model_fields)):
                    raise InvalidRequest(f"unknown setting(s) in {name}: {', '.join(wrong)}; "
                                         f"the settings are: {', '.join(section.model_fields)}")
        policy = await actions.set_policy(
            self.ledger, scope, changes, operator, reason, replace=replace
        )
        return policy.model_dump(mode="json")

    async def dead_letter_list(self, service: str | None, limit: int = DEAD_LETTER_LIST_LIMIT) -> list[dict[str, Any]]:
        """The newest dead letters, each with the state of its feedback (whether a replay can still count)."""
        entries = await self._dlq().latest(service, limit)
        states: dict[tuple[str, str], str | None] = {}
        for entry in entries:
            scope, feedback_id = entry.get("scope"), entry.get("feedback_id")
            entry["feedback_state"] = None
            # As the dead letter's body says: looked up only where both are what the events allow.
            if isinstance(scope, str) and isinstance(feedback_id, str) and re.fullmatch(ev.SCOPE_PATTERN, scope) \
                    and re.fullmatch(ev.ID_PATTERN, feedback_id):
                if (scope, feedback_id) not in states:
                    try:
                        record = await self.ledger.record(scope, feedback_id)
                        states[(scope, feedback_id)] = record.state if record else None
                    except UnreadableRecord:  # a record that no longer parses is what put letters here
                        states[(scope, feedback_id)] = "unreadable"
                entry["feedback_state"] = states[(scope, feedback_id)]
        return entries

    async def dead_letter_replay(self, sequence: int, body: ReplayRequest) -> dict[str, Any]:
        async def still_counts(event: ev.Event) -> None:
            if body.force or type(event) not in PIPELINE_EVENTS:
                return
            record = await self.ledger.record(event.scope, event.feedback_id)
            if record is not None and record.state in ("promoted", "rejected"):
                why = f" ({'; '.join(record.reasons)})" if record.state == "rejected" and record.reasons else ""
                raise Refused(
                    f"feedback {event.feedback_id} of scope {event.scope} was decided already: {record.state}"
                    f"{why[:400]}; what replaying this {event.type} leads to would not be considered. To train it "
                    "again, submit its feedback again under a new id; to replay it all the same, force it (--force)"
                )

        return await self._dlq().replay(sequence, body.operator, body.reason, still_counts, body.request_id)

    def _dlq(self) -> DeadLetters:
        found = self._dead_letters()
        if found is None:
            raise Unavailable("the dead letters are not reachable from this registry (it runs without NATS)")
        return found

    async def ask(self, scope: str, body: AskRequest) -> dict[str, Any]:
        answerer = self._answerer()
        if answerer is None:
            raise Unavailable("answering is turned off in this registry (registry.ask_enabled)")
        try:
            return await answerer.answer(scope, body.question, body.max_new_tokens)
        except Busy as exc:
            raise Unavailable(str(exc)) from exc
