"""The values the SEAL events carry (probes, feedback contents, directives, self-edits, scores)
and the pieces every contract is built from: the base :class:`Contract`, the id and text types,
and readable validation errors.

:mod:`shared.events` builds the events from these and re-exports every name, so callers may
import either way.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

# A scope names an adapter line: a product, a team or one user. It appears in
# object keys and KV keys, so it is restricted to a safe alphabet.
SCOPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-.:]{0,127}$"

Scope = Annotated[str, StringConstraints(pattern=SCOPE_PATTERN)]
Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
SHORT_TEXT_MAX = 2_000
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=SHORT_TEXT_MAX)]
LONG_TEXT_CHARS = 20_000
LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=LONG_TEXT_CHARS)]
# Closed-book accuracies are fractions; a reward is the change of one, so it lies in [-1, 1].
Accuracy = Annotated[float, Field(ge=0.0, le=1.0)]
Reward = Annotated[float, Field(ge=-1.0, le=1.0)]
# A version number; the first version of a scope is 1.
VersionNumber = Annotated[int, Field(ge=1)]
REASON_CHARS = 2_000
MAX_REASONS = 100


def _cut_reason(value: Any) -> Any:
    # A reason is written by a service from an exception or a gate; one from PEFT or torch can
    # list every tensor (tens of KB). It is cut, with a mark, rather than refused: refusing it
    # would lose the event that reports the failure.
    if isinstance(value, str) and len(value) > REASON_CHARS:
        return value[: REASON_CHARS - 1] + "\u2026"
    return value


def _cut_reasons(value: Any) -> Any:
    if isinstance(value, list | tuple) and len(value) > MAX_REASONS:
        return (*value[: MAX_REASONS - 1], f"... and {len(value) - MAX_REASONS + 1} more")
    return value


Reason = Annotated[str, BeforeValidator(_cut_reason)]
Reasons = Annotated[tuple[Reason, ...], BeforeValidator(_cut_reasons)]


def new_id() -> str:
    return uuid.uuid4().hex


_ID_NAMESPACE = uuid.UUID("6f1c9a4e-5a0b-4d8e-9d6b-2f1e5c7a9b3d")


def derived_id(*parts: object) -> str:
    """A deterministic id from its parts: redelivery of a cause yields the same id."""
    return uuid.uuid5(_ID_NAMESPACE, "\x1f".join(str(p) for p in parts)).hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventValidationError(ValueError):
    """A payload that is not a valid event; ``str()`` is meant for people."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or []


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """Turn pydantic's error list into one short readable sentence per problem."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"... and {more} more problem(s)")
    return "; ".join(parts)


class Contract(BaseModel):
    """Base for every value object that crosses a service boundary."""

    # No NaN or infinity anywhere: JSON parsing takes the bare tokens, and one NaN reward makes
    # every comparison among a feedback's candidates false.
    model_config = ConfigDict(frozen=True, extra="ignore", str_max_length=100_000, allow_inf_nan=False)


# --------------------------------------------------------------------------- values


class Probe(Contract):
    """A closed-book question that tells whether a fact was learned."""

    question: ShortText
    answer: ShortText
    aliases: tuple[ShortText, ...] = Field(default=(), max_length=20)
    source: Literal["product", "self_generated"] = "product"


def probes_by_source(probes: Sequence[Probe]) -> tuple[tuple[Probe, ...], tuple[Probe, ...]]:
    """(the product's probes, the generator's self-generated ones), each in the order given."""
    return tuple(p for p in probes if p.source == "product"), tuple(p for p in probes if p.source == "self_generated")


def probe_chars(probe: Probe) -> int:
    """The characters a probe holds: what it costs wherever it is kept."""
    return len(probe.question) + len(probe.answer) + sum(len(a) for a in probe.aliases)


# All of one feedback's probes together: the registry keeps a copy per candidate in one record,
# which must stay well inside NATS's 1 MB message.
MAX_FEEDBACK_PROBE_CHARS = 20_000


class KnowledgeFeedback(Contract):
    kind: Literal["knowledge"] = "knowledge"
    passage: LongText
    title: ShortText | None = None
    probes: tuple[Probe, ...] = Field(default=(), max_length=50)

    @model_validator(mode="after")
    def _probes_within_size(self) -> "KnowledgeFeedback":
        total = sum(probe_chars(p) for p in self.probes)
        if total > MAX_FEEDBACK_PROBE_CHARS:
            raise ValueError(
                f"the probes hold {total} characters in all, more than {MAX_FEEDBACK_PROBE_CHARS}: "
                "ask short questions with short answers"
            )
        return self


class CorrectionFeedback(Contract):
    kind: Literal["correction"] = "correction"
    question: ShortText
    wrong_answer: ShortText | None = None
    right_answer: ShortText


class PreferenceExample(Contract):
    prompt: ShortText
    response: LongText


class PreferenceFeedback(Contract):
    kind: Literal["preference"] = "preference"
    instruction: LongText
    examples: tuple[PreferenceExample, ...] = Field(default=(), max_length=20)


FeedbackContent = Annotated[
    Union[KnowledgeFeedback, CorrectionFeedback, PreferenceFeedback],
    Field(discriminator="kind"),
]

SelfEditFormat = Literal["implications", "rewrite", "self_qa", "correction", "preference"]


# What a LoRA update may train: every linear layer, or those of the attention or feed-forward blocks.
TargetModules = Literal["all-linear", "attention", "mlp"]


class TrainingDirectives(Contract):
    """Hyperparameters of one inner-loop update; always within ``BOUNDS``.

    A self-edit may propose these (SEAL's few-shot directives); the generator
    clamps them with :meth:`clamped` before they travel.
    """

    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "learning_rate": (1e-6, 1e-3),
        "epochs": (1, 20),
        "lora_rank": (1, 64),
        "lora_alpha": (1, 128),
        "batch_size": (1, 32),
        # At least 128 where a model proposes it: its rehearsal examples (34-44 tokens of chat
        # template and prompt before their answer) and question-answer pairs are cut to this, and
        # below it they lost their answers, and the rehearsal with them, without a word.
        "max_seq_len": (128, 2048),
        "adapter_scale": (0.05, 1.0),
    }
    FLOATS: ClassVar[frozenset[str]] = frozenset({"learning_rate", "adapter_scale"})

    learning_rate: float = Field(default=1e-4, ge=1e-6, le=1e-3)
    epochs: int = Field(default=3, ge=1, le=20)
    lora_rank: int = Field(default=8, ge=1, le=64)
    lora_alpha: int = Field(default=16, ge=1, le=128)
    batch_size: int = Field(default=4, ge=1, le=32)
    max_seq_len: int = Field(default=256, ge=16, le=2048)
    target_modules: TargetModules = "all-linear"
    # The trained LoRA update (B @ A) is multiplied by this before it is stored: below 1, a
    # gentler version of the same training (the generator's strength ladder, ScopePolicy).
    adapter_scale: float = Field(default=1.0, ge=0.05, le=1.0)
    # Indices into the self-edit's sequences to train on; ``None`` means all.
    use_sequences: tuple[int, ...] | None = Field(default=None, max_length=256)
    seed: int = Field(default=0, ge=0, lt=2**32)  # what torch and numpy both take

    @classmethod
    def clamped(cls, proposed: dict[str, Any] | None) -> "TrainingDirectives":
        """Defaults for what is absent or unusable, proposals pulled into bounds."""
        values: dict[str, Any] = {}
        for name, raw in (proposed or {}).items():
            if name in cls.BOUNDS:
                low, high = cls.BOUNDS[name]
                try:
                    number = float(raw)
                except (TypeError, ValueError, OverflowError):  # OverflowError: an int of 400 digits
                    continue
                if number != number:  # NaN
                    continue
                number = min(max(number, low), high)
                values[name] = number if name in cls.FLOATS else int(round(number))
            elif name == "target_modules" and raw in get_args(TargetModules):
                values[name] = raw
            elif name == "use_sequences" and isinstance(raw, (list, tuple)):
                idx = [int(i) for i in raw if isinstance(i, int) and 0 <= i < 256]
                values[name] = tuple(dict.fromkeys(idx)) or None
        return cls(**values)


# Candidates of one feedback at most: the policy's own and the ladder's rungs (the generator stops there).
MAX_CANDIDATES = 64
# Which of a feedback's candidates an event is about, and how many there are: bounded, so no event
# can make the registry hold (and write) millions of candidate records for one feedback.
CandidateIndex = Annotated[int, Field(ge=0, lt=MAX_CANDIDATES)]
CandidateCount = Annotated[int, Field(ge=1, le=MAX_CANDIDATES)]


def check_candidate(index: int, count: int | None) -> None:
    if count is not None and index >= count:
        raise ValueError(f"candidate_index {index} is not below candidate_count {count}")


class SelfEdit(Contract):
    """Training data the model wrote for itself, plus how to train on it."""

    self_edit_id: Identifier
    format: SelfEditFormat
    completion: str = Field(max_length=50_000)
    sequences: tuple[Annotated[str, StringConstraints(min_length=1, max_length=4_000)], ...] = Field(
        min_length=1, max_length=256
    )
    directives: TrainingDirectives = TrainingDirectives()
    candidate_index: CandidateIndex = 0
    candidate_count: CandidateCount = 1
    # How many of ``sequences`` the model wrote; the rest are the feedback's own and
    # rule-written ones. The outer loop learns only from self-edits that kept some.
    written: int = Field(default=0, ge=0, le=256)

    @model_validator(mode="after")
    def _candidate_within_count(self) -> "SelfEdit":
        check_candidate(self.candidate_index, self.candidate_count)
        return self


class PolicyExample(Contract):
    """A (prompt, completion) pair for the generator's own policy adapter."""

    prompt: LongText
    completion: LongText
    reward: Reward = 0.0
    # Where it came from (the policy adapter's lineage): the decided feedback and its self-edit.
    feedback_id: Identifier | None = None
    self_edit_id: Identifier | None = None


class ManifestRef(Contract):
    """Where an adapter lives and the digest of its manifest."""

    uri: str = Field(pattern=r"^s3://[^/]+/.+")
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Scores(Contract):
    """Closed-book accuracies in [0, 1]; ``None`` where a set was empty."""

    target: Accuracy | None = None
    target_product: Accuracy | None = None
    target_self_generated: Accuracy | None = None
    regression: Accuracy | None = None
    core: Accuracy | None = None
    earlier_feedback: Accuracy | None = None
    details: dict[Annotated[str, StringConstraints(max_length=200)], float] = Field(default_factory=dict, max_length=256)


class GateResult(Contract):
    gate: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    reason: Reason = ""


# --------------------------------------------------------------------------- events
