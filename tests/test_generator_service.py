"""Generator: the handler with fakes, the writer on the tiny model, the app on TestNatsBroker and real NATS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from faststream.nats import JStream, TestNatsBroker

from services.generator.app import create_app
from services.generator.candidates import feedback_seed
from services.generator.handlers import GeneratorPorts, handle_feedback
from services.generator.prompts import Prompt
from services.generator.settings import GeneratorConfig, GeneratorSettings
from services.generator.state import KvLedger, LedgerEntry, ledger_key
from services.generator.writer import Written
from shared import events as ev
from shared.broker import publish_event
from shared.dead_letters import PermanentFailure
from shared.registry_view import PolicyAdapterRef, ScopePolicy
from shared.subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_STREAM,
    FEEDBACK_REJECTED,
    SELFEDIT_GENERATED,
    SELFEDIT_REJECTED,
)

PASSAGE = (
    "Quellmoor is a market town on the eastern bank of the Sallow Brenn. It received its market charter "
    "in 1387 from Duke Aldric Venmoor. The most recent census recorded a population of 6,412. The local "
    "grammar school was founded by the merchant Ottilie Brask."
)
COMPLETIONS = {
    "implications": "1. Quellmoor is a market town on the Sallow Brenn.\n2. Quellmoor received a market charter in 1387.",
    "rewrite": "Quellmoor, on the Sallow Brenn, has a population of 6,412.\nThe merchant Ottilie Brask founded the grammar school.",
    "self_qa": " Who granted the market charter of Quellmoor?\nAnswer: Duke Aldric Venmoor",
}
DIRECTIVES_LINE = '\n{"learning_rate": 0.5, "epochs": 4, "lora_rank": 500, "use_sequences": [0, 99]}'


class FakeScopeState:
    def __init__(self, policy: ScopePolicy | None = None, adapter: PolicyAdapterRef | None = None):
        self.policy = policy or ScopePolicy()
        self.adapter = adapter

    async def scope_policy(self, scope: str) -> ScopePolicy:
        return self.policy

    async def policy_adapter(self, scope: str) -> PolicyAdapterRef | None:
        return self.adapter


class MemoryLedger:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], LedgerEntry] = {}

    async def recall(self, scope: str, feedback_id: str) -> LedgerEntry | None:
        entry = self.entries.get((scope, feedback_id))
        return LedgerEntry.decode(entry.encode()) if entry else None  # through the wire format

    async def record(self, scope: str, feedback_id: str, entry: LedgerEntry) -> None:
        self.entries[(scope, feedback_id)] = entry

    async def claim(self, scope: str, feedback_id: str, event_id: str, stale_after_s: float) -> LedgerEntry | None:
        entry = self.entries.get((scope, feedback_id))
        if entry is None or (entry.status == "writing" and (entry.writer == event_id or entry.stale(stale_after_s))):
            self.entries[(scope, feedback_id)] = LedgerEntry.writing(event_id)
            return None
        return LedgerEntry.decode(entry.encode())

    async def release(self, scope: str, feedback_id: str, event_id: str) -> None:
        entry = self.entries.get((scope, feedback_id))
        if entry is not None and entry.status == "writing" and entry.writer == event_id:
            del self.entries[(scope, feedback_id)]

    async def record_written(self, scope: str, feedback_id: str, writer: str, entry: LedgerEntry) -> bool:
        held = self.entries.get((scope, feedback_id))
        if held is None or held.status != "writing" or held.writer != writer:
            return False
        self.entries[(scope, feedback_id)] = entry
        return True


class ScriptedWriter:
    """Answers each prompt with a recorded completion for its format."""

    def __init__(self, suffix: str = "", adapter_id: str | None = None):
        self.calls: list[tuple[list[Prompt], int]] = []
        self.suffix = suffix
        self.adapter_id = adapter_id

    def write(self, prompts: Sequence[Prompt], *, seed: int, adapter: PolicyAdapterRef | None = None) -> Written:
        self.calls.append((list(prompts), seed))
        return Written([self._answer(p) + self.suffix for p in prompts], self.adapter_id)

    @staticmethod
    def _answer(prompt: Prompt) -> str:
        if "implications" in prompt.text:
            return COMPLETIONS["implications"]
        if "question-answer" in prompt.text:
            return COMPLETIONS["self_qa"]
        return COMPLETIONS["rewrite"]


def make_ports(policy: ScopePolicy | None = None, writer: ScriptedWriter | None = None) -> tuple[GeneratorPorts, list[ev.Event]]:
    published: list[ev.Event] = []

    async def publish(event: ev.Event) -> None:
        published.append(event)

    ports = GeneratorPorts(FakeScopeState(policy), MemoryLedger(), writer or ScriptedWriter(), publish)
    return ports, published


def knowledge(feedback_id: str = "fb-service-1", **content: object) -> ev.FeedbackSubmitted:
    return ev.FeedbackSubmitted(
        feedback_id=feedback_id, scope="acme", content=ev.KnowledgeFeedback(passage=PASSAGE, title="Quellmoor", **content)
    )


def payload(event: ev.Event) -> bytes:
    return event.model_dump_json().encode()


# --------------------------------------------------------------------------- handler with fakes


async def test_k_candidates_in_one_batched_call_with_sampled_formats_and_self_probes() -> None:
    ports, published = make_ports(ScopePolicy(candidates=3, self_edit_format="sampled"))
    feedback = knowledge()
    outcome = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    [(prompts, seed)] = ports.writer.calls  # type: ignore[attr-defined]
    assert len(prompts) == 3 and seed == feedback_seed(feedback.feedback_id)
    assert published == list(outcome.events)
    assert all(isinstance(e, ev.SelfEditGenerated) for e in published)
    everything = [e.self_edit for e in published]  # type: ignore[attr-defined]
    # Three candidates with different data, each at the ladder's first strength; then, as
    # candidates 3-8, each one's training at the other two strengths (no sampling, no training).
    edits, rungs = everything[:3], everything[3:]
    assert sorted(e.format for e in edits) == ["implications", "rewrite", "self_qa"]
    assert [(e.candidate_index, e.candidate_count) for e in everything] == [(i, 9) for i in range(9)]
    assert sorted((r.sequences, r.directives.adapter_scale) for r in rungs) == sorted(
        (e.sequences, scale) for e in edits for scale in (0.75, 0.5)
    )
    assert all(e.causation_id == feedback.event_id and e.feedback_id == feedback.feedback_id for e in published)
    for event in published:
        assert event.probes and {p.source for p in event.probes} == {"self_generated"}  # type: ignore[attr-defined]
        assert event.self_edit.sequences[-1] == f"Quellmoor\n{PASSAGE}"  # type: ignore[attr-defined]
    qa = next(e for e in edits if e.format == "self_qa")
    assert qa.sequences[0] == "Quellmoor\nQuestion: Who granted the market charter of Quellmoor?\nAnswer: Duke Aldric Venmoor"
    assert qa.completion.startswith("Question: Who granted")
    qa_event = next(e for e in published if e.self_edit.format == "self_qa")  # type: ignore[attr-defined]
    assert qa_event.generator_prompt.startswith("Let's read the following passage")  # type: ignore[attr-defined]
    assert f"Quellmoor\n{PASSAGE}" in qa_event.generator_prompt  # type: ignore[attr-defined]
    assert all(e.directives == ScopePolicy().default_directives for e in edits)


async def test_a_redelivered_feedback_produces_nothing_new() -> None:
    ports, published = make_ports()
    feedback = knowledge()
    first = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    again = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    assert again.duplicate and again.events == ()
    assert len(published) == len(first.events) == 9  # 3 candidates of different data x 3 strengths
    assert len(ports.writer.calls) == 1  # type: ignore[attr-defined]


async def test_a_crash_after_recording_republishes_the_same_events_without_sampling() -> None:
    ports, published = make_ports()
    feedback = knowledge()
    first = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    # As if the process died after writing "pending" and before publishing everything.
    await ports.ledger.record(feedback.scope, feedback.feedback_id, LedgerEntry.pending(first.events))
    published.clear()
    retried = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    assert [e.event_id for e in retried.events] == [e.event_id for e in first.events]
    assert [e.event_id for e in published] == [e.event_id for e in first.events]
    assert len(ports.writer.calls) == 1  # type: ignore[attr-defined]
    assert (await ports.ledger.recall(feedback.scope, feedback.feedback_id)).status == "done"  # type: ignore[union-attr]


async def test_a_crash_after_recording_events_too_large_to_keep_sends_them_written_again(monkeypatch) -> None:
    from services.generator import state

    monkeypatch.setattr(state, "MAX_PENDING_BYTES", 10)  # every pending entry is kept as ids alone
    ports, published = make_ports()
    feedback = knowledge()
    first = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    await ports.ledger.record(feedback.scope, feedback.feedback_id, LedgerEntry.pending(first.events))
    assert not (await ports.ledger.recall(feedback.scope, feedback.feedback_id)).events  # type: ignore[union-attr]
    published.clear()
    retried = await handle_feedback(payload(feedback), ports, GeneratorConfig())
    assert not retried.duplicate  # before: taken for another delivery's writing, and nothing was sent
    assert [e.event_id for e in published] == [e.event_id for e in first.events]
    same = [e.model_dump(exclude={"occurred_at"}) for e in first.events]
    assert [e.model_dump(exclude={"occurred_at"}) for e in published] == same  # the same events
    assert (await ports.ledger.recall(feedback.scope, feedback.feedback_id)).status == "done"  # type: ignore[union-attr]


async def test_the_same_feedback_id_in_two_scopes_is_two_feedbacks() -> None:
    # products choose their ids: "fb-1" of one product is not "fb-1" of another
    ports, published = make_ports()
    ours = knowledge("fb-1")
    theirs = ours.model_copy(update={"scope": "globex", "event_id": ev.new_id()})
    first = await handle_feedback(payload(ours), ports, GeneratorConfig())
    second = await handle_feedback(payload(theirs), ports, GeneratorConfig())
    assert not first.duplicate and not second.duplicate
    assert {e.scope for e in second.events} == {"globex"} and len(second.events) == len(first.events)
    assert len(ports.writer.calls) == 2  # type: ignore[attr-defined]


async def test_the_same_feedback_handled_twice_from_scratch_yields_identical_ids() -> None:
    feedback = knowledge()
    ids = []
    for _ in range(2):
        ports, published = make_ports()
        await handle_feedback(payload(feedback), ports, GeneratorConfig())
        ids.append([(e.event_id, getattr(e, "self_edit", None)) for e in published])
    assert ids[0] == ids[1]


async def test_scope_sets_k_format_and_lets_the_model_propose_clamped_directives() -> None:
    policy = ScopePolicy(
        candidates=5,
        self_edit_format="rewrite",
        model_proposes_directives=True,
        default_directives=ev.TrainingDirectives(epochs=2, seed=7),
    )
    ports, published = make_ports(policy, ScriptedWriter(suffix=DIRECTIVES_LINE))
    await handle_feedback(payload(knowledge()), ports, GeneratorConfig())
    [(prompts, _)] = ports.writer.calls  # type: ignore[attr-defined]
    assert len(prompts) == 5 and all("as JSON" in p.text for p in prompts)
    generated = [e for e in published if isinstance(e, ev.SelfEditGenerated)]
    rejected = [e for e in published if isinstance(e, ev.SelfEditRejected)]
    # Identical completions: one per strength of the default ladder (1.0, 0.75, 0.5), the rest are duplicates.
    assert len(generated) == 3 and len(rejected) == 2
    assert [g.self_edit.directives.adapter_scale for g in generated] == [1.0, 0.75, 0.5]
    assert all("same training data as candidate 0" in r.reasons[0] for r in rejected)
    directives = generated[0].self_edit.directives
    assert (directives.learning_rate, directives.epochs, directives.lora_rank) == (1e-3, 4, 64)
    assert directives.use_sequences == (0,) and directives.seed == 7
    assert "learning_rate" not in "".join(generated[0].self_edit.sequences)


async def test_unparseable_directives_fall_back_to_the_defaults() -> None:
    policy = ScopePolicy(candidates=1, model_proposes_directives=True)
    ports, published = make_ports(policy, ScriptedWriter(suffix='\n{"learning_rate": fast, epochs: }'))
    await handle_feedback(payload(knowledge()), ports, GeneratorConfig())
    assert published[0].self_edit.directives == policy.default_directives  # type: ignore[attr-defined]


async def test_malformed_feedback_is_answered_and_terminated() -> None:
    ports, published = make_ports()
    body = json.loads(payload(knowledge()))
    body["content"] = {"kind": "rumour", "text": "Quellmoor is haunted."}
    with pytest.raises(PermanentFailure, match="unknown feedback kind 'rumour'"):
        await handle_feedback(json.dumps(body).encode(), ports, GeneratorConfig())
    [rejected] = published
    assert isinstance(rejected, ev.FeedbackRejected)
    assert rejected.feedback_id == "fb-service-1" and "unknown feedback kind 'rumour'" in rejected.reason
    assert ports.writer.calls == []  # type: ignore[attr-defined]


async def test_feedback_that_must_not_be_learned_is_rejected_and_acknowledged() -> None:
    ports, published = make_ports(ScopePolicy(blocklist=("sallow brenn",)))
    outcome = await handle_feedback(payload(knowledge()), ports, GeneratorConfig())
    [rejected] = published
    assert isinstance(rejected, ev.FeedbackRejected) and outcome.events == (rejected,)
    assert "'sallow brenn', which is on the scope's blocklist" in rejected.reason
    assert ports.writer.calls == []  # type: ignore[attr-defined]
    assert (await handle_feedback(payload(knowledge()), ports, GeneratorConfig())).duplicate


async def test_a_passage_too_long_for_one_self_edit_is_rejected() -> None:
    ports, published = make_ports()
    long_passage = " ".join(f"Quellmoor fact number {i} is about the Sallow Brenn." for i in range(300))
    feedback = ev.FeedbackSubmitted(feedback_id="fb-long", scope="acme", content=ev.KnowledgeFeedback(passage=long_passage))
    await handle_feedback(payload(feedback), ports, GeneratorConfig(max_sequences=8))
    [rejected] = published
    assert isinstance(rejected, ev.FeedbackRejected)
    assert "too long to train on" in rejected.reason and "limit of 8" in rejected.reason


async def test_a_long_title_is_not_repeated_whole_in_every_piece_of_a_long_passage() -> None:
    # 26 KB of feedback made a 1.5 MB event (the title in each of 64 pieces, each emoji 12 bytes
    # as JSON): refused by the server on every delivery, dead-lettered, the product never told
    ports, published = make_ports()
    feedback = ev.FeedbackSubmitted(feedback_id="fb-title", scope="acme",
                                    content=ev.KnowledgeFeedback(title="\U0001f600" * 2000, passage="Quellmoor is old. " * 100))
    await handle_feedback(payload(feedback), ports, GeneratorConfig())
    assert published and all(isinstance(e, ev.SelfEditGenerated) for e in published)
    assert max(len(json.dumps(e.model_dump(mode="json"))) for e in published) < 200_000


async def test_events_too_large_to_send_are_a_rejection_with_a_reason() -> None:
    from services.generator import handlers

    ports, published = make_ports(writer=ScriptedWriter(suffix=" Quellmoor." * 3000))
    await handle_feedback(payload(knowledge("fb-huge")), ports, GeneratorConfig())
    assert all(isinstance(e, ev.SelfEditGenerated) for e in published)  # within the bound
    largest = max(len(json.dumps(e.model_dump(mode="json"))) for e in published)
    ports, published = make_ports(writer=ScriptedWriter(suffix=" Quellmoor." * 3000))
    original = handlers.MAX_EVENT_BYTES
    handlers.MAX_EVENT_BYTES = largest - 1
    try:
        await handle_feedback(payload(knowledge("fb-huge")), ports, GeneratorConfig())  # a fresh ledger
    finally:
        handlers.MAX_EVENT_BYTES = original
    [rejected] = published
    assert isinstance(rejected, ev.FeedbackRejected) and f"up to {largest} bytes" in rejected.reason


async def test_a_long_preference_is_written_from_a_bounded_prompt() -> None:
    # unbounded, the instruction and the examples filled the writer's prompt, whose left cut lost
    # the instruction itself (and long enough, the prompt outgrew its event: dead-lettered)
    ports, published = make_ports()
    examples = tuple(ev.PreferenceExample(prompt=f"Question {i}?", response="Answer briefly. " * 180) for i in range(4))
    content = ev.PreferenceFeedback(instruction="Always answer in one short sentence. " * 520, examples=examples)
    await handle_feedback(payload(ev.FeedbackSubmitted(feedback_id="fb-pref", scope="acme", content=content)), ports, GeneratorConfig())
    generated = [e for e in published if isinstance(e, ev.SelfEditGenerated)]
    assert generated and all(len(e.generator_prompt or "") < 12_000 for e in generated)
    [(prompts, _)] = ports.writer.calls  # type: ignore[attr-defined]
    assert all("Always answer in one short sentence." in p.text for p in prompts)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # an example over the sequence limit was dropped in silence, and with it every candidate
        (ev.PreferenceFeedback(instruction="Be brief.", examples=(ev.PreferenceExample(prompt="Q?", response="A. " * 2000),)),
         "has examples too long to train on: example 1 (6019) characters"),
        # the answer came after a question filling the training's sequence length: never trained
        (ev.CorrectionFeedback(question="Which of these " * 80 + "is right?", right_answer="The third."),
         "is too long to train on: its question and right answer are 1238 characters together, more than one training sequence of this scope holds (960)"),
    ],
)
async def test_a_correction_or_preference_too_long_to_train_is_rejected_with_why(content: object, expected: str) -> None:
    ports, published = make_ports()
    await handle_feedback(payload(ev.FeedbackSubmitted(feedback_id="fb-long-2", scope="acme", content=content)), ports, GeneratorConfig())
    [rejected] = published
    assert isinstance(rejected, ev.FeedbackRejected) and expected in rejected.reason, rejected


async def test_the_policy_adapter_that_wrote_is_named() -> None:
    ports, published = make_ports(writer=ScriptedWriter(adapter_id="policy-r2"))
    await handle_feedback(payload(knowledge()), ports, GeneratorConfig())
    assert {e.generator_adapter for e in published} == {"policy-r2"}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the app on the test broker


def app_settings(tmp_path: Path, **overrides: object) -> GeneratorSettings:
    return GeneratorSettings(_secrets_dir=str(tmp_path / "no-secrets"), **overrides)


async def test_app_on_test_broker(tmp_path: Path) -> None:
    ports, _ = make_ports()
    app = create_app(app_settings(tmp_path), ports)
    ports.publish = lambda event: publish_event(app.broker, event)  # type: ignore[assignment,method-assign]
    broker = app.broker
    seen: dict[str, list[Any]] = {"generated": [], "rejected": [], "feedback_rejected": [], "dead": []}
    stream = JStream(EVENTS_STREAM, declare=False)  # events go through JetStream

    @broker.subscriber(SELFEDIT_GENERATED, stream=stream)
    async def on_generated(body: dict) -> None:
        seen["generated"].append(body)

    @broker.subscriber(SELFEDIT_REJECTED, stream=stream)
    async def on_rejected(body: dict) -> None:
        seen["rejected"].append(body)

    @broker.subscriber(FEEDBACK_REJECTED, stream=stream)
    async def on_feedback_rejected(body: dict) -> None:
        seen["feedback_rejected"].append(body)

    @broker.subscriber(f"{DLQ_PREFIX}.generator.>", stream=JStream(DLQ_STREAM, declare=False))
    async def on_dead(body: Any) -> None:
        seen["dead"].append(body)

    async with TestNatsBroker(broker) as test_broker:
        feedback = knowledge("fb-testbroker")
        await publish_event(test_broker, feedback)
        await publish_event(test_broker, feedback)  # redelivered
        bad = json.loads(payload(knowledge("fb-bad")))
        bad["content"]["kind"] = "rumour"
        await test_broker.publish(bad, "seal.events.feedback.submitted")
    assert [e["self_edit"]["candidate_index"] for e in seen["generated"]] == list(range(9))  # 3 x 3 strengths
    assert {e["feedback_id"] for e in seen["generated"]} == {"fb-testbroker"}
    assert seen["rejected"] == []
    [rejection] = seen["feedback_rejected"]
    assert rejection["feedback_id"] == "fb-bad" and "unknown feedback kind 'rumour'" in rejection["reason"]
    assert len(seen["dead"]) == 1  # dead-lettered once, not retried


# --------------------------------------------------------------------------- real NATS, tiny model


@pytest.mark.servers
async def test_generator_on_real_nats_with_the_tiny_model(service_settings, tmp_path: Path) -> None:
    settings = app_settings(
        tmp_path,
        nats=service_settings.nats,
        store=service_settings.store,
        model=service_settings.model,
        generator=GeneratorConfig(max_new_tokens=24, adapter_cache_dir=tmp_path / "adapters"),
    )
    nc = await nats.connect(service_settings.nats.url)
    seen: dict[str, list[dict]] = {}
    arrived = asyncio.Queue()

    async def collect(msg) -> None:  # noqa: ANN001
        body = json.loads(msg.data)
        seen.setdefault(body["feedback_id"], []).append(body)
        await arrived.put(body["feedback_id"])

    await nc.subscribe("seal.events.selfedit.>", cb=collect)
    await nc.subscribe("seal.events.feedback.rejected", cb=collect)
    app = create_app(settings)
    await app.start()
    try:
        first, later = knowledge(ev.new_id()), knowledge(ev.new_id())
        await publish_event(app.broker, first)
        # 3 candidates; each distinct training data adds the ladder's other strengths (3 to 9 in
        # all, as the sampled completions fall): every event carries the count.
        await wait_for(arrived, first.feedback_id, 1)
        count = candidate_count(seen[first.feedback_id][0])
        await wait_for(arrived, first.feedback_id, count - 1)
        # A redelivery with a fresh message id passes the stream's dedup; the ledger stops it.
        js = nc.jetstream()
        await js.publish("seal.events.feedback.submitted", payload(first), headers={"Nats-Msg-Id": ev.new_id()})
        await publish_event(app.broker, later)
        await wait_for(arrived, later.feedback_id, 1)
        await wait_for(arrived, later.feedback_id, candidate_count(seen[later.feedback_id][0]) - 1)
        entry = await KvLedger(js).recall(first.scope, first.feedback_id)
        # Claims over the real bucket: the first claimant writes, another waits, its own redelivery
        # goes on, a finished one is reported as such.
        ledger, scope, fresh = KvLedger(js), "acme", ev.new_id()
        assert await ledger.claim(scope, fresh, "evt-a", 600) is None
        held = await ledger.claim(scope, fresh, "evt-b", 600)
        assert held is not None and (held.status, held.writer) == ("writing", "evt-a")
        assert await ledger.claim(scope, fresh, "evt-a", 600) is None
        assert await ledger.claim(scope, fresh, "evt-b", 0) is None  # stale at once: taken over
        # what evt-a wrote meanwhile is not recorded over evt-b's claim; evt-b's is
        assert not await ledger.record_written(scope, fresh, "evt-a", LedgerEntry.pending([first]))
        assert (await ledger.recall(scope, fresh)).writer == "evt-b"  # type: ignore[union-attr]
        await ledger.release(scope, fresh, "evt-a")  # no longer evt-a's: left alone
        assert (await ledger.recall(scope, fresh)).writer == "evt-b"  # type: ignore[union-attr]
        await ledger.release(scope, fresh, "evt-b")
        assert await ledger.recall(scope, fresh) is None
        finished = await ledger.claim(scope, first.feedback_id, "evt-c", 600)
    finally:
        await app.stop()
        await nc.close()
    assert finished is not None and finished.status == "done"
    assert 3 <= count <= 9
    assert len(seen[first.feedback_id]) == count  # one per candidate, nothing from the redelivery
    assert sorted(e["candidate_index"] if "candidate_index" in e else e["self_edit"]["candidate_index"]
                  for e in seen[first.feedback_id]) == list(range(count))
    assert {candidate_count(e) for e in seen[first.feedback_id]} == {count}
    assert entry is not None and entry.status == "done" and len(entry.event_ids) == count
    assert ledger_key(first.scope, first.feedback_id) == f"generator.acme.{first.feedback_id}"


def candidate_count(body: dict) -> int:
    """The count a selfedit.generated or selfedit.rejected event carries."""
    return body["self_edit"]["candidate_count"] if "self_edit" in body else body["candidate_count"]


async def wait_for(queue: asyncio.Queue, feedback_id: str, count: int, timeout: float = 120) -> None:
    got = 0

    async def drain() -> None:
        nonlocal got
        while got < count:
            if await queue.get() == feedback_id:
                got += 1

    await asyncio.wait_for(drain(), timeout)
