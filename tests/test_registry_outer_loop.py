"""The outer loop (ReST-EM) through the ledger: rewarded self-edits pool into policy rounds."""

from __future__ import annotations

from test_registry_support import evaluated, feedback, make_world

from services.registry import handlers
from services.registry.outer_loop import PolicyPool, policy_pool_key
from shared import events as ev
from shared.registry_view import ScopePolicy
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS


def generated(root: ev.Event, index: int, count: int, completion: str, written: int = 1) -> ev.SelfEditGenerated:
    edit = ev.SelfEdit(
        self_edit_id=f"{root.feedback_id}-se{index}",
        format="implications",
        completion=completion,
        sequences=("Quellmoor's charter dates from 1387.", "Quellmoor got its charter in 1387."),
        candidate_index=index,
        candidate_count=count,
        written=written,
    )
    return root.caused(
        ev.SelfEditGenerated, key=index, self_edit=edit, generator_prompt=f"Write implications of passage {root.feedback_id}"
    )


async def decide(world, rewards: list[tuple[float, bool]], written: tuple[int, ...] | None = None, completions=None) -> ev.FeedbackSubmitted:
    root = feedback()
    await handlers.on_feedback_submitted(root, world.ledger, None)
    count = len(rewards)
    for i, (reward, passed) in enumerate(rewards):
        completion = completions[i] if completions else f"completion {i} of {root.feedback_id}"
        await handlers.on_selfedit_generated(generated(root, i, count, completion, written[i] if written else 1), world.ledger)
    head = await world.ledger.head("acme")  # trained on the active version, as the trainer would
    parent = {"parent_version": head.version, "parent_adapter_id": head.adapter_id} if head else {}
    for i, (reward, passed) in enumerate(rewards):
        await handlers.on_adapter_evaluated(evaluated(root, i, count, reward=reward, passed=passed, **parent), world.ledger)
    return root


async def with_policy(world, **changes: object) -> None:
    await world.state.put(KV_SCOPE_SETTINGS, "acme", ScopePolicy(candidates=2, **changes))


async def test_off_by_default_no_round_is_ever_requested() -> None:
    w = make_world()
    await w.state.put(KV_SCOPE_SETTINGS, "acme", ScopePolicy(candidates=2))
    for _ in range(3):
        await decide(w, [(0.4, True), (0.2, True)])
    assert w.bus.of(ev.PolicyTrainingRequested) == []
    assert await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool) is None


async def test_rewarded_self_edits_pool_until_a_round_is_full() -> None:
    w = make_world()
    await with_policy(w, policy_round_examples=3, policy_min_reward=0.1)
    # Counted: passed with reward >= 0.1 and some written piece kept. Not counted: failed gates,
    # a reward below the minimum, a self-edit of rule-written data only.
    first = await decide(w, [(0.4, True), (0.3, False)])
    second = await decide(w, [(0.05, True), (0.2, True)], written=(1, 0))
    assert w.bus.of(ev.PolicyTrainingRequested) == []
    pool = await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool)
    assert pool is not None and [e.completion for e in pool.examples] == [f"completion 0 of {first.feedback_id}"]
    assert pool.counted == (first.feedback_id, second.feedback_id)

    third = await decide(w, [(0.3, True), (0.5, True)])
    [request] = w.bus.of(ev.PolicyTrainingRequested)
    assert request.round == 1 and request.scope == "acme" and request.feedback_id == third.feedback_id
    assert [(e.completion, e.reward) for e in request.examples] == [
        (f"completion 0 of {first.feedback_id}", 0.4),
        (f"completion 1 of {third.feedback_id}", 0.5),  # best reward first within a feedback
        (f"completion 0 of {third.feedback_id}", 0.3),
    ]
    assert request.examples[0].prompt == f"Write implications of passage {first.feedback_id}"
    # each example names its feedback and self-edit: the policy adapter's lineage
    assert [e.feedback_id for e in request.examples] == [first.feedback_id, third.feedback_id, third.feedback_id]
    assert all(e.self_edit_id for e in request.examples)
    assert request.directives == ScopePolicy().policy_directives
    pool = await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool)
    assert pool is not None and (pool.rounds, pool.examples, pool.outbox) == (1, (), ())


async def test_a_feedback_is_counted_once_and_the_same_completion_once() -> None:
    w = make_world()
    await with_policy(w, policy_round_examples=2)
    root = await decide(w, [(0.4, True), (0.3, True)], completions=["same words", "same words"])
    # The decided feedback is settled again (a late redelivery, the sweep): nothing more is counted.
    await w.ledger.settle("acme", root.feedback_id)
    await handlers.on_adapter_evaluated(evaluated(root, 1, 2, reward=0.3), w.ledger)
    pool = await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool)
    assert pool is not None and [(e.completion, e.reward) for e in pool.examples] == [("same words", 0.4)]
    assert w.bus.of(ev.PolicyTrainingRequested) == []


async def test_a_late_event_long_after_the_pool_forgot_a_feedback_counts_nothing(monkeypatch) -> None:
    """The pool remembers the last 1000 feedback it counted; a feedback is counted as it closes, so
    an event about it that comes later still (a replayed dead letter, say) adds no example again."""
    from services.registry import outer_loop

    monkeypatch.setattr(outer_loop, "COUNTED_KEPT", 1)
    w = make_world()
    await with_policy(w, policy_round_examples=10)
    root = await decide(w, [(0.4, True), (0.3, True)])
    await decide(w, [(0.4, True)])  # the pool forgets root
    await handlers.on_adapter_evaluated(evaluated(root, 1, 2, reward=0.3), w.ledger)
    await w.ledger.settle("acme", root.feedback_id)
    pool = await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool)
    assert pool is not None and [e.feedback_id for e in pool.examples].count(root.feedback_id) == 2  # its two, once


async def test_a_completion_too_long_for_a_policy_example_is_left_out_and_the_decision_stands() -> None:
    w = make_world()
    await with_policy(w, policy_round_examples=5)
    root = await decide(w, [(0.4, True), (0.3, True)], completions=["x" * 20_001, "short and kept"])
    assert w.bus.of(ev.AdapterPromoted)[-1].feedback_id == root.feedback_id
    pool = await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool)
    assert pool is not None and [e.completion for e in pool.examples] == ["short and kept"]
    assert pool.counted == (root.feedback_id,)


async def test_a_request_that_failed_to_publish_goes_out_on_the_next_settle_with_the_same_id() -> None:
    w = make_world()
    await with_policy(w, policy_round_examples=1)
    w.bus.fail_next = 10  # the broker is down while the feedback is decided
    root = feedback()
    await handlers.on_feedback_submitted(root, w.ledger, None)
    for i in range(2):
        await handlers.on_selfedit_generated(generated(root, i, 2, f"c{i}"), w.ledger)
    for i in range(2):
        try:
            await handlers.on_adapter_evaluated(evaluated(root, i, 2, reward=0.3), w.ledger)
        except ConnectionError:
            pass
    assert w.bus.of(ev.PolicyTrainingRequested) == []
    w.bus.fail_next = 0
    await w.ledger.sweep()
    await w.ledger.settle("acme", root.feedback_id)
    requests = w.bus.of(ev.PolicyTrainingRequested)
    assert len({r.event_id for r in requests}) == 1 and requests[0].round == 1
    assert len(requests[0].examples) == 2
    pool = await w.state.read(KV_REGISTRY, policy_pool_key("acme"), PolicyPool)
    assert pool is not None and pool.outbox == () and pool.rounds == 1


async def test_the_trained_policy_adapter_becomes_the_scopes_generator() -> None:
    from shared.registry_view import PolicyAdapterRef, policy_key

    w = make_world()
    await with_policy(w, policy_round_examples=1)
    await decide(w, [(0.4, True), (0.1, False)])
    [request] = w.bus.of(ev.PolicyTrainingRequested)
    ref = ev.ManifestRef(uri="s3://b/adapters/acme/p1", manifest_sha256="a" * 64)
    await handlers.on_policy_trained(
        request.caused(ev.PolicyAdapterTrained, adapter_id="p1", adapter=ref, round=request.round), w.ledger
    )
    found = await w.state.read(KV_REGISTRY, policy_key("acme"), PolicyAdapterRef)
    assert found is not None and (found.adapter_id, found.round) == ("p1", 1)
