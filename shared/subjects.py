"""Every subject, stream, consumer and KV bucket of the platform, defined once.

Services import names from here and nowhere else. Events live in one stream
(``SEAL_EVENTS``, subjects ``seal.events.>``) which is also the audit log;
messages that failed ``max_deliver`` times are copied to ``SEAL_DLQ``.
Operator actions land in ``SEAL_AUDIT``. JetStream's notices that a consumer of the events gave up
on a message are kept in ``SEAL_ADVISORIES`` until the registry has copied the message. Registry queries and commands go
over core NATS request-reply (``seal.rpc.registry.*``), not through a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from shared import events as ev

EVENTS_STREAM = "SEAL_EVENTS"
DLQ_STREAM = "SEAL_DLQ"
AUDIT_STREAM = "SEAL_AUDIT"
ADVISORIES_STREAM = "SEAL_ADVISORIES"

EVENTS_PREFIX = "seal.events"
DLQ_PREFIX = "seal.dlq"
AUDIT_PREFIX = "seal.audit"
RPC_PREFIX = "seal.rpc"

# One subject per event type; the type tag and the subject always agree.
SUBJECTS: dict[type[ev.Event], str] = {
    cls: f"{EVENTS_PREFIX}.{cls.model_fields['type'].default}" for cls in ev.EVENT_TYPES.values()
}
SUBJECTS[ev.OperatorAction] = f"{AUDIT_PREFIX}.operator.action"

FEEDBACK_SUBMITTED = SUBJECTS[ev.FeedbackSubmitted]
FEEDBACK_REJECTED = SUBJECTS[ev.FeedbackRejected]
SELFEDIT_GENERATED = SUBJECTS[ev.SelfEditGenerated]
SELFEDIT_REJECTED = SUBJECTS[ev.SelfEditRejected]
REBASE_REQUESTED = SUBJECTS[ev.RebaseRequested]
ADAPTER_TRAINED = SUBJECTS[ev.AdapterTrained]
ADAPTER_TRAINING_FAILED = SUBJECTS[ev.AdapterTrainingFailed]
ADAPTER_EVALUATED = SUBJECTS[ev.AdapterEvaluated]
ADAPTER_EVALUATION_FAILED = SUBJECTS[ev.AdapterEvaluationFailed]
ADAPTER_PROMOTED = SUBJECTS[ev.AdapterPromoted]
ADAPTER_REJECTED = SUBJECTS[ev.AdapterRejected]
ADAPTER_AWAITING_APPROVAL = SUBJECTS[ev.AdapterAwaitingApproval]
ADAPTER_ROLLED_BACK = SUBJECTS[ev.AdapterRolledBack]
POLICY_TRAINING_REQUESTED = SUBJECTS[ev.PolicyTrainingRequested]
POLICY_TRAINED = SUBJECTS[ev.PolicyAdapterTrained]
OPERATOR_ACTION = SUBJECTS[ev.OperatorAction]

# JetStream's notice that a consumer of the events gave up on a message: every delivery went
# unanswered. Published once, to whoever listens then: kept in a stream of its own, so that one
# sent while no registry runs (restarting, or all its pods down) is still read.
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{EVENTS_STREAM}.*"

# Registry request-reply (core NATS).
REGISTRY_RPC = f"{RPC_PREFIX}.registry"


def subject_for(event: ev.Event | type[ev.Event]) -> str:
    cls = event if isinstance(event, type) else type(event)
    return SUBJECTS[cls]


def dead_letter_subject(service: str, subject: str) -> str:
    return f"{DLQ_PREFIX}.{service}.{subject}"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age: timedelta
    duplicate_window: timedelta = timedelta(minutes=10)


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(EVENTS_STREAM, (f"{EVENTS_PREFIX}.>",), max_age=timedelta(days=90)),
    StreamSpec(DLQ_STREAM, (f"{DLQ_PREFIX}.>",), max_age=timedelta(days=30)),
    StreamSpec(AUDIT_STREAM, (f"{AUDIT_PREFIX}.>",), max_age=timedelta(days=3650)),
    StreamSpec(ADVISORIES_STREAM, (MAX_DELIVERIES_ADVISORY,), max_age=timedelta(days=30)),
)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer shared by every replica of one service."""

    durable: str
    subject: str
    stream: str = EVENTS_STREAM
    max_deliver: int = 5
    ack_wait: timedelta = timedelta(seconds=60)
    # Redelivery delay after a failed handler's nak, in seconds, by delivery (a missed ack comes
    # back after ack_wait). Five deliveries span about 5 minutes: a transient failure is an S3 or
    # NATS restart or a leader election, which a minute did not always cover (every event in
    # flight then went to the dead letters).
    backoff: tuple[float, ...] = (2, 15, 60, 240)


GENERATOR_FEEDBACK = ConsumerSpec("generator-feedback", FEEDBACK_SUBMITTED, ack_wait=timedelta(seconds=120))
TRAINER_SELFEDITS = ConsumerSpec("trainer-selfedits", SELFEDIT_GENERATED, ack_wait=timedelta(seconds=60))
TRAINER_REBASES = ConsumerSpec("trainer-rebases", REBASE_REQUESTED, ack_wait=timedelta(seconds=60))
TRAINER_POLICY = ConsumerSpec("trainer-policy", POLICY_TRAINING_REQUESTED, ack_wait=timedelta(seconds=60))
EVALUATOR_ADAPTERS = ConsumerSpec("evaluator-adapters", ADAPTER_TRAINED, ack_wait=timedelta(seconds=120))
REGISTRY_EVALUATED = ConsumerSpec("registry-evaluated", ADAPTER_EVALUATED)
REGISTRY_TRAINING_FAILED = ConsumerSpec("registry-training-failed", ADAPTER_TRAINING_FAILED)
REGISTRY_EVALUATION_FAILED = ConsumerSpec("registry-evaluation-failed", ADAPTER_EVALUATION_FAILED)
REGISTRY_SELFEDITS = ConsumerSpec("registry-selfedits", SELFEDIT_GENERATED)
REGISTRY_TRAINED = ConsumerSpec("registry-trained", ADAPTER_TRAINED)
REGISTRY_SELFEDIT_REJECTED = ConsumerSpec("registry-selfedit-rejected", SELFEDIT_REJECTED)
REGISTRY_FEEDBACK = ConsumerSpec("registry-feedback", FEEDBACK_SUBMITTED)
REGISTRY_FEEDBACK_REJECTED = ConsumerSpec("registry-feedback-rejected", FEEDBACK_REJECTED)
REGISTRY_POLICY_TRAINED = ConsumerSpec("registry-policy-trained", POLICY_TRAINED)
# Tried for about half a day, not 5 minutes: what fails here is storing the copy (the dead-letter
# stream away), and the message it copies is otherwise lost without a trace.
REGISTRY_EXHAUSTED = ConsumerSpec("registry-exhausted", MAX_DELIVERIES_ADVISORY, stream=ADVISORIES_STREAM,
                                  max_deliver=50, backoff=(2, 15, 60, 240, 900))

CONSUMERS: tuple[ConsumerSpec, ...] = (
    GENERATOR_FEEDBACK,
    TRAINER_SELFEDITS,
    TRAINER_REBASES,
    TRAINER_POLICY,
    EVALUATOR_ADAPTERS,
    REGISTRY_EVALUATED,
    REGISTRY_TRAINING_FAILED,
    REGISTRY_EVALUATION_FAILED,
    REGISTRY_SELFEDITS,
    REGISTRY_TRAINED,
    REGISTRY_SELFEDIT_REJECTED,
    REGISTRY_FEEDBACK,
    REGISTRY_FEEDBACK_REJECTED,
    REGISTRY_POLICY_TRAINED,
    REGISTRY_EXHAUSTED,
)

# JetStream key-value buckets (registry state, compare-and-set).
KV_REGISTRY = "seal_registry"
KV_SCOPE_SETTINGS = "seal_scope_settings"
KV_IDEMPOTENCY = "seal_processed"
KV_BUCKETS: tuple[str, ...] = (KV_REGISTRY, KV_SCOPE_SETTINGS, KV_IDEMPOTENCY)
# How long a bucket keeps a key after its last write (absent: for ever). What the services
# note in ``seal_processed`` (a feedback handled, a training's parent) only matters while the
# message it was noted for can still be delivered, so it lives 10 days longer than the
# events stream keeps a message (a key is written after its message was published: at least 10
# days after the message is gone); without a bound it grew by a key or two per feedback.
KV_MAX_AGE: dict[str, timedelta] = {
    KV_IDEMPOTENCY: next(s.max_age for s in STREAMS if s.name == EVENTS_STREAM) + timedelta(days=10)
}
