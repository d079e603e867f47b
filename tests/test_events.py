"""Event contracts: round trips, tolerance of unknown fields, readable rejection."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from shared import events as ev
from shared.subjects import CONSUMERS, STREAMS, SUBJECTS, subject_for

REF = ev.ManifestRef(uri="s3://seal-adapters/adapters/acme/a1", manifest_sha256="ab" * 32)
PROBE = ev.Probe(question="When was Quellmoor chartered?", answer="1387", aliases=("in 1387",))
SELF_EDIT = ev.SelfEdit(
    self_edit_id="se1",
    format="implications",
    completion="Quellmoor was chartered in 1387.",
    sequences=("Quellmoor was chartered in 1387.",),
    directives=ev.TrainingDirectives(learning_rate=1e-4, epochs=2),
    candidate_index=1,
    candidate_count=3,
)
COMMON = {"feedback_id": "fb1", "scope": "acme"}
EVALUATED = {
    "type": "adapter.evaluated", "feedback_id": "f", "scope": "s", "adapter_id": "a", "self_edit_id": "e",
    "adapter": {"uri": "s3://b/k", "manifest_sha256": "0" * 64}, "candidate_scores": {}, "parent_scores": {},
    "reward": 0.2, "passed": True,
}

EXAMPLES: list[ev.Event] = [
    ev.FeedbackSubmitted(**COMMON, content=ev.KnowledgeFeedback(passage="Quellmoor ...", title="Q", probes=(PROBE,))),
    ev.FeedbackSubmitted(**COMMON, content=ev.CorrectionFeedback(question="Capital?", wrong_answer="Lyon", right_answer="Paris")),
    ev.FeedbackSubmitted(
        **COMMON,
        content=ev.PreferenceFeedback(instruction="Answer tersely.", examples=(ev.PreferenceExample(prompt="Hi", response="Hello."),)),
    ),
    ev.FeedbackRejected(**COMMON, reason="passage is empty"),
    ev.SelfEditGenerated(**COMMON, self_edit=SELF_EDIT, probes=(PROBE,)),
    ev.SelfEditRejected(**COMMON, self_edit_id="se1", reasons=("contains an email address",)),
    ev.RebaseRequested(**COMMON, self_edit=SELF_EDIT, parent_version=2),
    ev.AdapterTrained(**COMMON, adapter_id="a1", self_edit_id="se1", adapter=REF, parent_adapter=REF, final_loss=0.5),
    ev.AdapterTrainingFailed(**COMMON, self_edit_id="se1", reason="loss became NaN at step 3"),
    ev.AdapterEvaluated(
        **COMMON, adapter_id="a1", self_edit_id="se1", adapter=REF,
        candidate_scores=ev.Scores(target=0.6, core=0.99), parent_scores=ev.Scores(target=0.2, core=1.0),
        reward=0.4, passed=True, gates=(ev.GateResult(gate="min_gain", passed=True, value=0.4, threshold=0.01),),
    ),
    ev.AdapterEvaluationFailed(**COMMON, adapter_id="a1", self_edit_id="se1", reason="sha256 mismatch"),
    ev.AdapterPromoted(**COMMON, adapter_id="a1", version=1, adapter=REF, reward=0.4),
    ev.AdapterRejected(**COMMON, adapter_id="a1", reasons=("regression drop 0.05 > 0.02",)),
    ev.FeedbackDecided(**COMMON, outcome="promoted", version=1, adapter_id="a1"),
    ev.AdapterAwaitingApproval(**COMMON, adapter_id="a1", adapter=REF),
    ev.AdapterRolledBack(**COMMON, from_version=2, to_version=1, operator="sre@acme", reason="bad answers"),
    ev.PolicyTrainingRequested(**COMMON, examples=(ev.PolicyExample(prompt="p", completion="c", reward=0.4),)),
    ev.PolicyAdapterTrained(**COMMON, adapter_id="p1", adapter=REF),
    ev.OperatorAction(**COMMON, action="approve", operator="sre@acme", reason="looks right", adapter_id="a1"),
]


def test_every_event_type_has_an_example_and_a_subject() -> None:
    assert {type(e) for e in EXAMPLES} == set(ev.EVENT_TYPES.values())
    assert set(SUBJECTS) == set(ev.EVENT_TYPES.values())
    assert len(set(SUBJECTS.values())) == len(SUBJECTS)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_round_trip_through_json(event: ev.Event) -> None:
    wire = event.model_dump_json()
    assert type(event).from_json(wire) == event
    assert ev.parse_event(wire) == event
    assert ev.parse_event(json.loads(wire)) == event


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_unknown_fields_are_tolerated(event: ev.Event) -> None:
    payload = json.loads(event.model_dump_json())
    payload["added_in_a_later_release"] = {"anything": [1, 2]}
    assert ev.parse_event(payload) == event


def test_envelope_is_complete_and_frozen() -> None:
    event = EXAMPLES[0]
    for field in ("event_id", "feedback_id", "scope", "schema_version", "occurred_at", "causation_id"):
        assert field in type(event).model_fields
    with pytest.raises(Exception):
        event.scope = "other"  # type: ignore[misc]
    naive = ev.FeedbackRejected(**COMMON, reason="x", occurred_at=datetime(2026, 1, 1))
    assert naive.occurred_at.tzinfo is UTC


def test_caused_events_keep_lineage_and_are_deterministic() -> None:
    root = EXAMPLES[0]
    first = root.caused(ev.FeedbackRejected, reason="a")
    again = root.caused(ev.FeedbackRejected, reason="a")
    other = root.caused(ev.FeedbackRejected, key=2, reason="a")
    assert first.causation_id == root.event_id
    assert (first.feedback_id, first.scope) == (root.feedback_id, root.scope)
    assert first.event_id == again.event_id != other.event_id


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("{not json", "Invalid JSON"),
        ({"type": "feedback.submitted"}, "feedback_id: Field required"),
        ({"type": "gossip", "feedback_id": "f", "scope": "s"}, "does not match any of the expected tags"),
        (
            {"type": "feedback.submitted", "feedback_id": "f", "scope": "../../etc", "content": {"kind": "knowledge", "passage": "x"}},
            "scope: String should match pattern",
        ),
        (
            {"type": "feedback.submitted", "feedback_id": "f", "scope": "s", "content": {"kind": "knowledge", "passage": "x" * 20001}},
            "passage: String should have at most 20000 characters",
        ),
        (
            {"type": "feedback.submitted", "feedback_id": "f", "scope": "s", "content": {"kind": "rumour", "text": "x"}},
            "Input tag 'rumour'",
        ),
        (
            {"type": "feedback.rejected", "feedback_id": "f", "scope": "s", "reason": "x", "schema_version": 99},
            "schema_version 99 is newer",
        ),
        # 50 probes of 2,000 characters each: valid one by one, 200 KB together, copied per candidate
        (
            {"type": "feedback.submitted", "feedback_id": "f", "scope": "s", "content": {"kind": "knowledge", "passage": "x",
             "probes": [{"question": "q" * 1000, "answer": "a" * 1000}] * 50}},
            "the probes hold 100000 characters in all, more than 20000",
        ),
        # hostile candidate numbers: the registry would hold a record per candidate
        (
            {"type": "adapter.training_failed", "feedback_id": "f", "scope": "s", "self_edit_id": "e", "reason": "x",
             "candidate_index": 0, "candidate_count": 100000},
            "candidate_count: Input should be less than or equal to 64",
        ),
        (
            {"type": "selfedit.rejected", "feedback_id": "f", "scope": "s", "self_edit_id": "e", "reasons": ["x"],
             "candidate_index": 5, "candidate_count": 3},
            "candidate_index 5 is not below candidate_count 3",
        ),
        (
            {"type": "adapter.training_failed", "feedback_id": "f", "scope": "s", "self_edit_id": "e", "reason": "x",
             "candidate_index": -1, "candidate_count": 3},
            "candidate_index: Input should be greater than or equal to 0",
        ),
        # NaN and infinity (bare JSON tokens): one NaN reward made the registry's choice among
        # the candidates fail on every event that completed the feedback
        (
            '{"type": "adapter.evaluated", "feedback_id": "f", "scope": "s", "adapter_id": "a", "self_edit_id": "e",'
            ' "adapter": {"uri": "s3://b/k", "manifest_sha256": "' + "0" * 64 + '"},'
            ' "candidate_scores": {}, "parent_scores": {}, "reward": NaN, "passed": true}',
            "reward: Input should be a finite number",
        ),
        (
            {**EVALUATED, "candidate_scores": {"core": 1.5}},
            "candidate_scores.core: Input should be less than or equal to 1",
        ),
        (
            '{"type": "adapter.trained", "feedback_id": "f", "scope": "s", "adapter_id": "a", "self_edit_id": "e",'
            ' "adapter": {"uri": "s3://b/k", "manifest_sha256": "' + "0" * 64 + '"}, "final_loss": Infinity}',
            "final_loss: Input should be a finite number",
        ),
        ({**EVALUATED, "reward": 3.0}, "reward: Input should be less than or equal to 1"),
        ({**EVALUATED, "parent_version": -7}, "parent_version: Input should be greater than or equal to 1"),
    ],
)
def test_bad_payloads_raise_readable_errors(payload: object, expected: str) -> None:
    with pytest.raises(ev.EventValidationError) as info:
        ev.parse_event(payload if isinstance(payload, (str, dict)) else json.dumps(payload))
    assert expected in str(info.value)
    assert "Traceback" not in str(info.value) and "https://" not in str(info.value)


def test_directives_are_clamped_to_bounds() -> None:
    d = ev.TrainingDirectives.clamped(
        {"learning_rate": 5.0, "epochs": "ten", "lora_rank": 1e9, "batch_size": float("nan"), "use_sequences": [0, 0, 3, -1, "x"], "shell": "rm -rf /"}
    )
    assert d.learning_rate == 1e-3 and d.lora_rank == 64
    assert d.epochs == ev.TrainingDirectives().epochs and d.batch_size == ev.TrainingDirectives().batch_size
    assert d.use_sequences == (0, 3)
    with pytest.raises(Exception):
        ev.TrainingDirectives(learning_rate=1.0)
    # a 400-digit number copied from a passage into proposed directives is unusable, not a crash
    assert ev.TrainingDirectives.clamped({"epochs": 10**400}).epochs == ev.TrainingDirectives().epochs
    with pytest.raises(ValueError, match="seed"):
        ev.TrainingDirectives(seed=2**70)  # torch.manual_seed would fail mid-training


def test_an_event_about_one_self_edit_carries_a_bounded_number_of_probes() -> None:
    probe = {"question": "Which river?", "answer": "the Sallow Brenn"}
    adapter = {"uri": "s3://b/adapters/acme/a1", "manifest_sha256": "0" * 64}
    payload = {"type": "adapter.trained", "feedback_id": "f", "scope": "s", "adapter_id": "a1", "self_edit_id": "e",
               "adapter": adapter, "probes": [probe] * (ev.MAX_PROBES + 1)}
    with pytest.raises(ev.EventValidationError, match="probes: Tuple should have at most 100 items"):
        ev.parse_event(payload)
    assert len(ev.parse_event({**payload, "probes": [probe] * ev.MAX_PROBES}).probes) == ev.MAX_PROBES


def test_streams_hold_every_subject_and_consumers_are_unique() -> None:
    prefixes = [s.rstrip(">") for spec in STREAMS for s in spec.subjects]
    for subject in SUBJECTS.values():
        assert any(subject.startswith(p) for p in prefixes), subject
    durables = [c.durable for c in CONSUMERS]
    assert len(durables) == len(set(durables))
    assert subject_for(EXAMPLES[0]) == "seal.events.feedback.submitted"


def test_long_reasons_are_cut_not_refused() -> None:
    """A failure's reason comes from an exception (PEFT lists every tensor); refusing it would
    lose the event that reports the failure, so it is cut, and so is a long list of them."""
    failed = ev.AdapterEvaluationFailed(**COMMON, adapter_id="a1", self_edit_id="se1", reason="size mismatch " * 10_000)
    assert len(failed.reason) == 2_000 and failed.reason.endswith("\u2026")
    rejected = ev.AdapterRejected(**COMMON, reasons=tuple(f"forgot question {i}" for i in range(150)))
    assert len(rejected.reasons) == 100 and rejected.reasons[-1] == "... and 51 more"
    assert rejected.reasons[:99] == tuple(f"forgot question {i}" for i in range(99))
    again = ev.parse_event(rejected.model_dump_json())
    assert again == rejected


def test_what_follows_a_product_chosen_event_id_is_its_own_per_scope_and_feedback() -> None:
    """Products may choose their events' ids: two products (or two feedback of one) sending "ev-1"
    must not get one set of ids downstream, which JetStream's duplicate window would drop and the
    trainer would take for the same work (its adapter ids and parent pins derive from them)."""
    from services.generator.candidates import self_edit_id

    content = ev.KnowledgeFeedback(passage="Quellmoor got its charter in 1387.")
    ours = ev.FeedbackSubmitted(event_id="ev-1", feedback_id="fb-1", scope="acme", content=content)
    theirs = ours.model_copy(update={"scope": "globex"})
    next_one = ours.model_copy(update={"feedback_id": "fb-2"})
    follows = [f.caused(ev.FeedbackRejected, reason="r").event_id for f in (ours, theirs, next_one)]
    assert len(set(follows)) == 3
    assert len({self_edit_id(f, 0) for f in (ours, theirs, next_one)}) == 3
    # and a redelivery gets the very same ones
    assert ours.caused(ev.FeedbackRejected, reason="r").event_id == follows[0]
    assert self_edit_id(ours, 0) == self_edit_id(ours.model_copy(), 0)
