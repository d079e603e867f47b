"""Event contracts between the SEAL services.

Every message on the bus is one of the frozen pydantic models below. Each
carries the common envelope (``event_id``, ``feedback_id``, ``scope``,
``schema_version``, ``occurred_at``, ``causation_id``) and a ``type`` tag, so a
consumer can tell events apart without looking at the subject.

Compatibility rule: consumers *ignore* fields they do not know, so a producer
may add an optional field without breaking a running consumer. Removing or
re-typing a field is a new ``schema_version``.

Parsing untrusted input goes through :func:`parse_event` or
``Model.from_json``; both raise :class:`EventValidationError` whose message a
person can read ("feedback.passage: String should have at most 20000
characters"), never a raw traceback.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.contracts import (  # noqa: F401 - re-exported: the values are part of the events' contract
    ID_PATTERN,
    SCOPE_PATTERN,
    CandidateCount,
    CandidateIndex,
    Contract,
    CorrectionFeedback,
    EventValidationError,
    FeedbackContent,
    GateResult,
    Identifier,
    KnowledgeFeedback,
    LongText,
    ManifestRef,
    PolicyExample,
    PreferenceExample,
    PreferenceFeedback,
    Probe,
    Reason,
    Reasons,
    Reward,
    Scope,
    Scores,
    SelfEdit,
    SelfEditFormat,
    ShortText,
    TargetModules,
    TrainingDirectives,
    VersionNumber,
    check_candidate,
    derived_id,
    describe_validation_error,
    new_id,
    probes_by_source,
    utcnow,
)

SCHEMA_VERSION = 1
# Probes an event about one self-edit carries (its feedback's and the generator's own), and examples of a
# policy round at most: each is asked or trained on, so an event cannot hold a service for hours.
MAX_PROBES = 100
MAX_POLICY_EXAMPLES = 256

class Event(Contract):
    """The envelope every event carries."""

    type: str
    event_id: Identifier = Field(default_factory=new_id)
    feedback_id: Identifier
    scope: Scope
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    occurred_at: datetime = Field(default_factory=utcnow)
    causation_id: Identifier | None = None

    @model_validator(mode="after")
    def _candidate_within_count(self) -> "Event":
        # every event about one of a feedback's candidates carries both
        if hasattr(self, "candidate_count"):
            check_candidate(self.candidate_index, self.candidate_count)  # type: ignore[attr-defined]
        return self

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is newer than this service understands ({SCHEMA_VERSION})")
        return value

    def caused(self, event_cls: type[E], key: object = "", **fields: Any) -> E:
        """Build the next event of this lineage: same feedback and scope, caused by this one.

        Its ``event_id`` is derived from this event's id, the new type and
        ``key``, so handling a redelivered message publishes the very same ids
        and JetStream's duplicate window (``Nats-Msg-Id``) drops the copies.
        """
        fields.setdefault("feedback_id", self.feedback_id)
        fields.setdefault("scope", self.scope)
        event_type = event_cls.model_fields["type"].default
        # The scope and the feedback too: a product may choose its events' ids, and two products
        # (or two feedback of one) under one id got the same ids downstream, which JetStream's
        # duplicate window dropped and the trainer took for the same work.
        fields.setdefault("event_id", derived_id(self.scope, self.feedback_id, self.event_id, event_type, key))
        return event_cls(causation_id=self.event_id, **fields)

    @classmethod
    def from_json(cls: type[E], payload: bytes | str | dict[str, Any]) -> E:
        try:
            if isinstance(payload, dict):
                return cls.model_validate(payload)
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            raise EventValidationError(
                f"invalid {cls.__name__}: {describe_validation_error(exc)}", exc.errors(include_url=False)
            ) from None


E = TypeVar("E", bound=Event)


class FeedbackSubmitted(Event):
    """A product tells the platform something new. The lineage root."""

    type: Literal["feedback.submitted"] = "feedback.submitted"
    content: FeedbackContent
    submitted_by: ShortText | None = None

    @model_validator(mode="before")
    @classmethod
    def _event_id_from_the_feedback(cls, data: Any) -> Any:
        # A product that leaves out event_id gets one derived from its scope and feedback id, the
        # same in every service that reads the message and on every retry (a random default gave
        # each consumer its own id, so lineage's event ids matched nothing, and retries differed).
        if isinstance(data, dict) and data.get("event_id") is None and isinstance(data.get("feedback_id"), str) \
                and isinstance(data.get("scope"), str):
            return {**data, "event_id": derived_id("feedback", data["scope"], data["feedback_id"])}
        return data


class FeedbackRejected(Event):
    type: Literal["feedback.rejected"] = "feedback.rejected"
    reason: Reason


class SelfEditGenerated(Event):
    """One candidate self-edit; the trainer trains each one."""

    type: Literal["selfedit.generated"] = "selfedit.generated"
    self_edit: SelfEdit
    probes: tuple[Probe, ...] = Field(default=(), max_length=MAX_PROBES)
    generator_adapter: str | None = None
    # The prompt the generator completed: with the completion, an outer-loop
    # (ReST-EM) training example once the self-edit is rewarded.
    generator_prompt: str | None = Field(default=None, max_length=50_000)


class SelfEditRejected(Event):
    type: Literal["selfedit.rejected"] = "selfedit.rejected"
    self_edit_id: Identifier
    candidate_index: CandidateIndex = 0
    candidate_count: CandidateCount = 1
    reasons: Reasons


class RebaseRequested(Event):
    """Registry -> trainer: train this self-edit again on the new active version."""

    type: Literal["training.rebase_requested"] = "training.rebase_requested"
    self_edit: SelfEdit
    probes: tuple[Probe, ...] = Field(default=(), max_length=MAX_PROBES)
    parent_version: VersionNumber | None = None
    attempt: int = Field(default=1, ge=1)


class AdapterTrained(Event):
    type: Literal["adapter.trained"] = "adapter.trained"
    adapter_id: Identifier
    self_edit_id: Identifier
    candidate_index: CandidateIndex = 0
    candidate_count: CandidateCount = 1
    parent_adapter_id: Identifier | None = None
    parent_version: VersionNumber | None = None
    parent_adapter: ManifestRef | None = None
    adapter: ManifestRef
    probes: tuple[Probe, ...] = Field(default=(), max_length=MAX_PROBES)
    final_loss: float | None = None
    seconds: float | None = None
    trace_id: str | None = None


class AdapterTrainingFailed(Event):
    type: Literal["adapter.training_failed"] = "adapter.training_failed"
    self_edit_id: Identifier
    candidate_index: CandidateIndex = 0
    candidate_count: CandidateCount = 1
    reason: Reason


class AdapterEvaluated(Event):
    type: Literal["adapter.evaluated"] = "adapter.evaluated"
    adapter_id: Identifier
    self_edit_id: Identifier
    candidate_index: CandidateIndex = 0
    candidate_count: CandidateCount = 1
    parent_adapter_id: Identifier | None = None
    parent_version: VersionNumber | None = None
    parent_adapter: ManifestRef | None = None
    adapter: ManifestRef
    candidate_scores: Scores
    parent_scores: Scores
    reward: Reward
    passed: bool
    gates: tuple[GateResult, ...] = Field(default=(), max_length=16)
    reasons: Reasons = ()
    probes: tuple[Probe, ...] = Field(default=(), max_length=MAX_PROBES)
    trace_id: str | None = None


class AdapterEvaluationFailed(Event):
    type: Literal["adapter.evaluation_failed"] = "adapter.evaluation_failed"
    adapter_id: Identifier
    self_edit_id: Identifier
    candidate_index: CandidateIndex = 0
    candidate_count: CandidateCount = 1
    reason: Reason


class AdapterPromoted(Event):
    type: Literal["adapter.promoted"] = "adapter.promoted"
    adapter_id: Identifier
    version: int = Field(ge=1)
    previous_version: VersionNumber | None = None
    adapter: ManifestRef
    reward: Reward | None = None
    approved_by: str | None = None


class FeedbackDecided(Event):
    """The end of one feedback's road, published once by the registry: promoted (as ``version``)
    or rejected (``reasons``: by its gates, an operator, its decision timeout, or the generator's
    refusal). What a product watches for its feedback, instead of piecing the outcome together
    from one ``adapter.*`` event per candidate."""

    type: Literal["feedback.decided"] = "feedback.decided"
    outcome: Literal["promoted", "rejected"]
    version: VersionNumber | None = None
    adapter_id: Identifier | None = None
    reasons: Reasons = ()
    decided_by: str | None = None


class AdapterRejected(Event):
    type: Literal["adapter.rejected"] = "adapter.rejected"
    adapter_id: Identifier | None = None
    self_edit_id: Identifier | None = None
    reasons: Reasons
    rejected_by: str | None = None


class AdapterAwaitingApproval(Event):
    type: Literal["adapter.awaiting_approval"] = "adapter.awaiting_approval"
    adapter_id: Identifier
    adapter: ManifestRef
    reward: Reward | None = None


class AdapterRolledBack(Event):
    type: Literal["adapter.rolled_back"] = "adapter.rolled_back"
    from_version: VersionNumber | None = None
    to_version: VersionNumber
    operator: str
    reason: Reason


class PolicyTrainingRequested(Event):
    """Registry -> trainer: train the generator's policy adapter (ReST-EM)."""

    type: Literal["policy.training_requested"] = "policy.training_requested"
    examples: tuple[PolicyExample, ...] = Field(min_length=1, max_length=MAX_POLICY_EXAMPLES)
    directives: TrainingDirectives = TrainingDirectives()
    round: int = Field(default=1, ge=1)


class PolicyAdapterTrained(Event):
    type: Literal["policy.trained"] = "policy.trained"
    adapter_id: Identifier
    adapter: ManifestRef
    round: int = 1


class OperatorAction(Event):
    """Audit record of an operator's decision (approve, reject, rollback, pin, a dead letter replayed)."""

    type: Literal["operator.action"] = "operator.action"
    action: Literal["approve", "reject", "rollback", "pin", "unpin", "set_policy", "replay"]
    operator: ShortText
    reason: ShortText
    target_version: VersionNumber | None = None
    adapter_id: Identifier | None = None


AnyEvent = Annotated[
    Union[
        FeedbackSubmitted,
        FeedbackRejected,
        SelfEditGenerated,
        SelfEditRejected,
        RebaseRequested,
        AdapterTrained,
        AdapterTrainingFailed,
        AdapterEvaluated,
        AdapterEvaluationFailed,
        AdapterPromoted,
        FeedbackDecided,
        AdapterRejected,
        AdapterAwaitingApproval,
        AdapterRolledBack,
        PolicyTrainingRequested,
        PolicyAdapterTrained,
        OperatorAction,
    ],
    Field(discriminator="type"),
]

_any_event: TypeAdapter[Any] = TypeAdapter(AnyEvent)
EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["type"].default: cls
    for cls in Event.__subclasses__()
}


def parse_event(payload: bytes | str | dict[str, Any]) -> Event:
    """Parse any event by its ``type`` tag, with a readable error on bad input."""
    try:
        if isinstance(payload, dict):
            return _any_event.validate_python(payload)
        return _any_event.validate_json(payload)
    except ValidationError as exc:
        raise EventValidationError(f"invalid event: {describe_validation_error(exc)}", exc.errors(include_url=False)) from None
