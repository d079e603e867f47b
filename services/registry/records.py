"""What the registry keeps: feedback records, candidates, versions, the scope head.

Everything here is a frozen pydantic model stored as JSON in JetStream KV;
changes are made with ``model_copy(update=...)`` inside a compare-and-set.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import Field

from shared.events import Contract, GateResult, ManifestRef, Probe, Scores, SelfEdit
from shared.registry_view import ActiveAdapter

# A candidate's *result* is a fact reported by the pipeline; its *verdict* is
# what the registry decided about it.
CandidateResult = Literal[
    "pending",
    "evaluated",
    "training_failed",
    "evaluation_failed",
    "selfedit_rejected",
    "unusable",  # its adapter could not be read back intact
    "timed_out",
]
Verdict = Literal["promoted", "awaiting_approval", "rejected"]
FeedbackState = Literal[
    "collecting",  # waiting for the outcome of every candidate
    "rebasing",  # the chosen candidate is being trained again on the new active version
    "awaiting_approval",  # held for an operator (manual policy or pinned scope)
    "promoting",  # decided; the scope head is being moved
    "promoted",
    "rejected",
]
OPEN_STATES: frozenset[str] = frozenset({"collecting", "rebasing", "awaiting_approval", "promoting"})
# How many feedback a listing returns by default, and at most.
FEEDBACK_LIST_LIMIT = 100
FEEDBACK_LIST_MAX = 1000
# A version listing: the latest this many by default, at most VERSION_LIST_MAX (a version record
# holds its probes, a few KB: 100 of them fit a NATS request-reply answer).
VERSION_LIST_LIMIT = 100
VERSION_LIST_MAX = 1000
# A scope listing, in name order: this many by default, at most SCOPE_LIST_MAX (a scope's row holds
# its pin reason, up to a few KB: a page must fit a NATS request-reply answer). ``after`` pages on.
SCOPE_LIST_LIMIT = 200
SCOPE_LIST_MAX = 1000


def key_token(identifier: str) -> str:
    """An id as one KV key token: ``.`` and ``:`` are not allowed there."""
    return identifier.replace("=", "=3D").replace(".", "=2E").replace(":", "=3A")


def token_id(token: str) -> str:
    """The id a :func:`key_token` stands for."""
    return token.replace("=2E", ".").replace("=3A", ":").replace("=3D", "=")


def head_key(scope: str) -> str:
    return f"active.{scope}"


def version_key(scope: str, version: int) -> str:
    return f"version.{scope}.{version}"


def feedback_key(scope: str, feedback_id: str) -> str:
    return f"feedback.{scope}.{key_token(feedback_id)}"


def head_outbox_key(scope: str, request_id: str) -> str:
    """Present while an operator's rollback or pin may have left events in the scope head's outbox:
    written before the change, removed by the action once they are out; the sweep publishes what a
    crash left (one per request: another action's flush can never remove it under this one)."""
    return f"headout.{scope}.{key_token(request_id)}"


def open_key(scope: str, feedback_id: str) -> str:
    return f"open.{scope}.{key_token(feedback_id)}"


def arrival_stamp(at: datetime) -> str:
    """A time as the arrival index writes it: UTC to the microsecond, sorting as time does (a
    naive time is taken as UTC)."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.strftime("%Y%m%dT%H%M%S%f")


def arrival_key(scope: str, at: datetime, feedback_id: str) -> str:
    """The arrival index: one key per feedback, named so that a scope's keys sort by when the
    registry first heard of each (``first_seen_at``)."""
    return f"arrived.{scope}.{arrival_stamp(at)}.{key_token(feedback_id)}"


def selfedit_key(scope: str, feedback_id: str, index: int) -> str:
    return f"selfedit.{scope}.{key_token(feedback_id)}.{index}"


def legacy_selfedit_key(feedback_id: str, index: int) -> str:
    """Where registries before scoped keys kept a self-edit (read only, for records they wrote)."""
    return f"selfedit.{key_token(feedback_id)}.{index}"


def seen_key(scope: str) -> str:
    return f"seen.{scope}"


class Attempt(Contract):
    """One training + evaluation of a candidate (a rebase makes another)."""

    attempt: int
    adapter_id: str | None = None
    parent_version: int | None = None
    reward: float | None = None
    passed: bool | None = None
    outcome: str = ""


class TrainingRun(Contract):
    adapter_id: str
    event_id: str
    parent_version: int | None = None
    parent_adapter_id: str | None = None
    final_loss: float | None = None
    seconds: float | None = None
    trace_id: str | None = None


class CandidateRecord(Contract):
    index: int
    result: CandidateResult = "pending"
    verdict: Verdict | None = None
    attempt: int = 1
    self_edit_id: str | None = None
    adapter_id: str | None = None
    adapter: ManifestRef | None = None
    parent_version: int | None = None
    parent_adapter_id: str | None = None
    reward: float | None = None
    passed: bool | None = None
    candidate_scores: Scores | None = None
    parent_scores: Scores | None = None
    gates: tuple[GateResult, ...] = ()
    # Why it failed, was rejected or held, in words a person can read.
    reasons: tuple[str, ...] = ()
    evaluation_event_id: str | None = None
    reported_at: datetime | None = None
    trace_id: str | None = None
    training: TrainingRun | None = None
    earlier_attempts: tuple[Attempt, ...] = ()
    product_probes: tuple[Probe, ...] = ()
    # The generator's own probes about the feedback, as the candidate was measured on them.
    self_generated_probes: tuple[Probe, ...] = ()

    @property
    def decided(self) -> bool:
        return self.verdict is not None

    def known_adapter(self, adapter_id: str) -> bool:
        return adapter_id == self.adapter_id or any(a.adapter_id == adapter_id for a in self.earlier_attempts)


class FeedbackRecord(Contract):
    """The lineage root: one feedback event and everything that came of it."""

    feedback_id: str
    scope: str
    state: FeedbackState = "collecting"
    kind: str | None = None
    summary: str | None = None
    submitted_by: str | None = None
    submitted_at: datetime | None = None
    first_seen_at: datetime
    deadline_at: datetime | None = None
    feedback_event_id: str | None = None
    # sha256 of the feedback's content as first recorded: the same id sent again with other content
    # is not taken (nothing would be trained on it, and lineage would show what was never learned).
    content_digest: str | None = None
    trace_id: str | None = None
    candidate_count: int | None = None
    count_from_generator: bool = False
    candidates: tuple[CandidateRecord, ...] = ()
    feedback_probes: tuple[Probe, ...] = ()
    chosen: int | None = None
    version: int | None = None
    hold: Literal["manual", "pinned"] | None = None
    reasons: tuple[str, ...] = ()
    decided_at: datetime | None = None
    decided_by: str | None = None
    # Events decided but not yet published (outbox): published, then removed.
    outbox: tuple[dict[str, Any], ...] = ()

    def probes_of(self, cand: CandidateRecord) -> tuple[Probe, ...]:
        """What a candidate of this feedback is measured on, and what the scope's regression set
        keeps of the feedback once it is promoted: the product's probes (from the candidate's
        events, else the feedback's own), then the generator's self-generated ones. Without the
        latter, feedback that carries a passage alone would leave nothing to guard."""
        return (*(cand.product_probes or self.feedback_probes), *cand.self_generated_probes)

    def candidate(self, index: int) -> CandidateRecord | None:
        for cand in self.candidates:
            if cand.index == index:
                return cand
        return None

    def with_candidate(self, cand: CandidateRecord) -> "FeedbackRecord":
        others = [c for c in self.candidates if c.index != cand.index]
        return self.model_copy(update={"candidates": tuple(sorted([*others, cand], key=lambda c: c.index))})

    def with_count(self, count: int) -> "FeedbackRecord":
        """Make sure candidates 0..count-1 exist (placeholders are pending)."""
        record = self
        for index in range(count):
            if record.candidate(index) is None:
                record = record.with_candidate(CandidateRecord(index=index))
        return record

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES


class VersionRecord(Contract):
    """One promoted version of a scope and its tags."""

    scope: str
    version: int = Field(ge=1)
    adapter_id: str
    adapter: ManifestRef
    parent_version: int | None = None
    parent_adapter_id: str | None = None
    feedback_id: str
    feedback_ids: tuple[str, ...] = ()
    candidate_index: int = 0
    self_edit_id: str | None = None
    reward: float | None = None
    candidate_scores: Scores | None = None
    parent_scores: Scores | None = None
    gates: tuple[GateResult, ...] = ()
    evaluation_event_id: str | None = None
    trace_id: str | None = None
    registry_trace_id: str | None = None
    base_model: str | None = None
    base_model_sha256: str | None = None
    promoted_at: datetime
    approved_by: str = "auto"
    probes: tuple[Probe, ...] = ()


# Operator actions a scope head remembers by request id (retries come within minutes).
RECENT_REQUESTS = 64


class ScopeHead(ActiveAdapter):
    """``active.<scope>``: what :class:`ActiveAdapter` readers see, plus the aliases.

    ``version``/``adapter_id``/``adapter`` are the active alias; the rest is
    registry bookkeeping that readers of ``ActiveAdapter`` ignore.
    """

    feedback_id: str | None = None
    previous_version: int | None = None
    latest_version: int = 0
    pinned_by: str | None = None
    pin_reason: str | None = None
    # (version, adapter_id) of recent promotions, newest last: makes a
    # re-run promotion idempotent even after the head moved on.
    recent: tuple[tuple[int, str], ...] = ()
    last_request_id: str | None = None
    # The request ids of the latest operator actions on the head, newest last: a retry of one (its
    # answer was lost) is known for one even after another operator's action came in between.
    recent_requests: tuple[str, ...] = ()
    updated_at: datetime | None = None
    # Events of an operator's rollback or pin not yet published (outbox): written with the change they
    # announce, published, then removed; one whose publish failed goes out with the scope's next
    # rollback, pin or promotion, or with the sweep once its marker is 5 minutes old.
    outbox: tuple[dict[str, Any], ...] = ()

    def handled(self, request_id: str) -> bool:
        """Whether the operator's action ``request_id`` already changed this head."""
        return request_id == self.last_request_id or request_id in self.recent_requests

    def remembering(self, request_id: str) -> dict[str, Any]:
        """The fields that record ``request_id`` as handled (for ``model_copy(update=...)``)."""
        return {"last_request_id": request_id,
                "recent_requests": (*self.recent_requests, request_id)[-RECENT_REQUESTS:]}

    def promoted_as(self, adapter_id: str) -> int | None:
        for version, promoted in self.recent:
            if promoted == adapter_id:
                return version
        return None


class SelfEditRecord(Contract):
    feedback_id: str
    scope: str
    event_id: str
    self_edit: SelfEdit
    probes: tuple[Probe, ...] = ()
    generator_adapter: str | None = None
    generator_prompt: str | None = None  # with the completion, an outer-loop example (outer_loop.py)


class Marker(Contract):
    """A key whose presence is the information (``seen.<scope>``, ``open.*``, ``arrived.*``)."""

    at: datetime | None = None
    feedback_id: str | None = None


WithOutbox = TypeVar("WithOutbox", bound=Contract)


def without_published(current: WithOutbox | None, sent: set[str]) -> WithOutbox | None:
    """``current`` (a record with an ``outbox``) with the events in ``sent`` taken out of it;
    None, for a compare-and-set to leave it, when none of them is there any more."""
    outbox = getattr(current, "outbox", ())
    if current is None or not any(item["event_id"] in sent for item in outbox):
        return None
    return current.model_copy(update={"outbox": tuple(item for item in outbox if item["event_id"] not in sent)})
