"""Concurrency: stale parents are rebased, compare-and-set conflicts never lose an update."""

from __future__ import annotations

import asyncio

from test_registry_support import evaluated, feedback, make_world, ref_for, self_edit

from services.registry import handlers, queries
from services.registry.records import FeedbackRecord, ScopeHead, feedback_key
from shared import events as ev
from shared.subjects import KV_REGISTRY


async def state_of(w, root: ev.Event) -> FeedbackRecord:
    found = await w.state.read(KV_REGISTRY, feedback_key(root.scope, root.feedback_id), FeedbackRecord)
    assert found is not None
    return found


async def test_two_feedbacks_in_flight_both_end_up_in_the_lineage() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    a, b = feedback(passage="Quellmoor got its charter in 1387."), feedback(passage="Its mayor is Ilse Varn.")
    for root in (a, b):
        await handlers.on_feedback_submitted(root, w.ledger, None)
        await handlers.on_selfedit_generated(self_edit(root, 0, 1), w.ledger)
    # Both were trained on the base model while neither was promoted.
    await handlers.on_adapter_evaluated(evaluated(a, 0, 1, reward=0.2), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.4), w.ledger)

    assert [(p.feedback_id, p.version) for p in w.bus.of(ev.AdapterPromoted)] == [(a.feedback_id, 1)]
    rebases = w.bus.of(ev.RebaseRequested)
    assert len(rebases) == 1
    rebase = rebases[0]
    assert rebase.feedback_id == b.feedback_id and rebase.parent_version == 1 and rebase.attempt == 2
    assert rebase.self_edit.self_edit_id == f"{b.feedback_id}-se0"
    assert rebase.probes and rebase.probes[0].answer == "1387"
    assert (await state_of(w, b)).state == "rebasing"

    # A late redelivery of b's first evaluation changes nothing.
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.4), w.ledger)
    assert (await state_of(w, b)).state == "rebasing"

    # The trainer trains it again on v1; the evaluator reports on that.
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.3, parent_version=1, attempt=2), w.ledger)
    promoted = w.bus.of(ev.AdapterPromoted)
    assert [(p.feedback_id, p.version, p.previous_version) for p in promoted] == [
        (a.feedback_id, 1, None),
        (b.feedback_id, 2, 1),
    ]
    versions = await queries.list_versions(w.ledger, "acme")
    assert [(v["version"], v["feedback_id"], v["aliases"]) for v in versions] == [
        (1, a.feedback_id, ["previous"]),
        (2, b.feedback_id, ["active"]),
    ]
    lineage = await queries.version_lineage(w.ledger, "acme", 2)
    assert lineage["ancestors"] == [{"version": 1, "adapter_id": versions[0]["adapter_id"], "feedback_id": a.feedback_id}]
    assert lineage["evaluation"]["attempt"] == 2
    assert "rebased onto v1" in lineage["evaluation"]["earlier_attempts"][0]["outcome"]
    fate = await queries.feedback_fate(w.ledger, b.feedback_id)
    assert fate["state"] == "promoted" and fate["version"] == 2


async def test_rebase_reads_the_self_edit_from_the_manifest_when_not_kept() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    a, b = feedback(), feedback()
    await handlers.on_adapter_evaluated(evaluated(a, 0, 1, reward=0.2), w.ledger)
    stale = evaluated(b, 0, 1, reward=0.2)
    w.manifests.self_edits[stale.adapter_id] = self_edit(b, 0, 1).self_edit.model_dump(mode="json")
    await handlers.on_adapter_evaluated(stale, w.ledger)
    assert [r.self_edit.self_edit_id for r in w.bus.of(ev.RebaseRequested)] == [f"{b.feedback_id}-se0"]
    rebased = evaluated(b, 0, 1, reward=0.2, parent_version=1, attempt=2)
    w.manifests.self_edits[rebased.adapter_id] = w.manifests.self_edits[stale.adapter_id]
    await handlers.on_adapter_evaluated(rebased, w.ledger)
    lineage = await queries.version_lineage(w.ledger, "acme", 2)
    assert lineage["self_edit"]["source"] == "manifest" and lineage["self_edit"]["self_edit_id"] == f"{b.feedback_id}-se0"


async def test_a_stale_candidate_waits_for_its_self_edit_event() -> None:
    """The self-edit consumer may lag behind the evaluation consumer."""
    w = make_world()
    await w.set_policy("acme", candidates=1)
    a, b = feedback(), feedback()
    await handlers.on_adapter_evaluated(evaluated(a, 0, 1, reward=0.2), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.2), w.ledger)
    assert (await state_of(w, b)).state == "collecting" and w.bus.of(ev.RebaseRequested) == []
    await handlers.on_selfedit_generated(self_edit(b, 0, 1), w.ledger)
    assert [r.feedback_id for r in w.bus.of(ev.RebaseRequested)] == [b.feedback_id]


async def test_without_its_self_edit_a_stale_candidate_is_rejected_with_a_reason() -> None:
    w = make_world(selfedit_wait_s=300)
    await w.set_policy("acme", candidates=1)
    a, b = feedback(), feedback()
    await handlers.on_adapter_evaluated(evaluated(a, 0, 1, reward=0.2), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.2), w.ledger)
    w.clock.advance(301)
    await w.ledger.sweep()
    record = await state_of(w, b)
    assert record.state == "rejected" and "could not be rebased" in record.reasons[0]
    assert w.bus.of(ev.RebaseRequested) == []


async def test_a_candidate_that_keeps_losing_the_race_is_rejected_after_max_attempts() -> None:
    w = make_world(max_rebase_attempts=2)
    await w.set_policy("acme", candidates=1)
    a, b, c = feedback(), feedback(), feedback()
    await handlers.on_selfedit_generated(self_edit(b, 0, 1), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(a, 0, 1, reward=0.2), w.ledger)  # v1
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.2), w.ledger)  # stale: rebase onto v1
    await handlers.on_adapter_evaluated(evaluated(c, 0, 1, reward=0.2, parent_version=1), w.ledger)  # v2
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.2, parent_version=1, attempt=2), w.ledger)
    record = await state_of(w, b)
    assert record.state == "rejected" and "giving up after 2 attempts" in record.reasons[0]
    assert [p.version for p in w.bus.of(ev.AdapterPromoted)] == [1, 2]


async def test_head_conflict_at_promotion_time_rebases_instead_of_overwriting() -> None:
    """Another replica promotes between our decision and our write of the head."""
    w = make_world()
    await w.set_policy("acme", candidates=1)
    root = feedback()
    await handlers.on_selfedit_generated(self_edit(root, 0, 1), w.ledger)
    intruder = ScopeHead(
        scope="acme", version=1, adapter_id="other", adapter=ref_for("acme", "other"),
        latest_version=1, recent=((1, "other"),), feedback_id="someone-else",
    )

    async def another_replica_promotes(bucket: str, key: str) -> None:
        if key == "active.acme" and await w.state.read(bucket, key, ScopeHead) is None:
            await w.state.put(bucket, key, intruder)

    w.state.before_write = another_replica_promotes
    await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.5), w.ledger)
    w.state.before_write = None

    assert w.state.conflicts >= 1
    head = await w.ledger.head("acme")
    assert head is not None and head.adapter_id == "other" and head.version == 1
    assert w.bus.of(ev.AdapterPromoted) == []
    assert [(r.parent_version, r.attempt) for r in w.bus.of(ev.RebaseRequested)] == [(1, 2)]
    assert (await state_of(w, root)).state == "rebasing"


async def test_concurrent_updates_of_one_record_are_all_kept() -> None:
    """Candidates reported at the same moment (several consumers, several replicas)."""
    w = make_world()
    root = feedback()

    async def interleave(bucket: str, key: str) -> None:
        await asyncio.sleep(0)  # let the other writers read the same revision

    w.state.before_write = interleave
    k = 4
    await asyncio.gather(*(handlers.on_adapter_evaluated(evaluated(root, i, k, reward=0.1 * i), w.ledger) for i in range(k)))
    w.state.before_write = None
    assert w.state.conflicts > 0
    record = await state_of(w, root)
    assert [c.result for c in record.candidates] == ["evaluated"] * k
    assert [p.adapter_id for p in w.bus.of(ev.AdapterPromoted)] == [f"ad-{root.feedback_id[:8]}-3-1"]
    assert len(w.bus.of(ev.AdapterRejected)) == k - 1


async def test_two_scopes_promote_concurrently_and_one_scope_serializes() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    await w.set_policy("globex", candidates=1)

    async def interleave(bucket: str, key: str) -> None:
        await asyncio.sleep(0)

    w.state.before_write = interleave
    roots = [feedback("acme"), feedback("acme"), feedback("globex")]
    for root in roots:
        await handlers.on_selfedit_generated(self_edit(root, 0, 1), w.ledger)
    await asyncio.gather(*(handlers.on_adapter_evaluated(evaluated(r, 0, 1, reward=0.2), w.ledger) for r in roots))
    w.state.before_write = None
    promoted = {(p.scope, p.version) for p in w.bus.of(ev.AdapterPromoted)}
    assert promoted == {("acme", 1), ("globex", 1)}
    # Exactly one acme feedback lost the race and went back for training on v1.
    assert [(r.scope, r.parent_version) for r in w.bus.of(ev.RebaseRequested)] == [("acme", 1)]


async def test_the_same_feedback_id_in_two_scopes_keeps_two_self_edits() -> None:
    """A product publishing on the bus itself can reuse another scope's feedback id: each scope's
    rebase and lineage must use its own self-edit, never the other scope's."""
    from services.registry.records import SelfEditRecord, legacy_selfedit_key

    w = make_world()
    acme = feedback("acme", "fb-1", passage="Quellmoor got its charter in 1387.")
    other = feedback("other", "fb-1", passage="Its mayor is Ilse Varn.")
    for root, text in ((acme, "Quellmoor's charter dates from 1387."), (other, "Ilse Varn is the mayor.")):
        await w.set_policy(root.scope, candidates=1)
        await handlers.on_feedback_submitted(root, w.ledger, None)
        generated = self_edit(root, 0, 1)
        edit = generated.self_edit.model_copy(update={"completion": text, "sequences": (text,)})
        await handlers.on_selfedit_generated(generated.model_copy(update={"self_edit": edit}), w.ledger)
    for root, text in ((acme, "1387"), (other, "Ilse Varn")):
        kept = await w.ledger.self_edit(root.scope, "fb-1", 0)
        assert kept is not None and kept.scope == root.scope and text in kept.self_edit.completion

    # A record a registry wrote before keys had a scope is read for its own scope, and only there.
    legacy = feedback("acme", "fb-2")
    old = SelfEditRecord(feedback_id="fb-2", scope="acme", event_id="e", self_edit=self_edit(legacy, 0, 1).self_edit)
    await w.state.put(KV_REGISTRY, legacy_selfedit_key("fb-2", 0), old)
    assert (await w.ledger.self_edit("acme", "fb-2", 0)) == old
    assert await w.ledger.self_edit("other", "fb-2", 0) is None


async def _third_promotion_interleaved(w, interleave):  # noqa: ANN001, ANN202
    """v1 and v2 of scope acme, then a third feedback promoted on v2 with ``interleave()`` run once,
    just before the promotion writes the scope's regression set; (the three feedback, the
    feedback ids the regression set holds after)."""
    from shared.registry_view import AcceptedProbes

    await w.set_policy("acme", candidates=1)
    roots = [feedback(passage=f"Fact {i}.") for i in range(3)]
    for i, root in enumerate(roots[:2]):
        await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2, parent_version=i or None), w.ledger)
    done: list[bool] = []

    async def once(bucket: str, key: str) -> None:
        if key == "probes.acme" and not done:
            done.append(True)
            await interleave()

    w.state.before_write = once
    await handlers.on_adapter_evaluated(evaluated(roots[2], 0, 1, reward=0.2, parent_version=2), w.ledger)
    w.state.before_write = None
    assert done
    accepted = await w.state.read(KV_REGISTRY, "probes.acme", AcceptedProbes)
    return roots, ({fid for fid, _ in accepted.probes} if accepted else None)


async def test_a_rollback_during_a_promotion_leaves_the_regression_set_of_the_active_version() -> None:
    # The promotion moved the head to v3; a rollback to v1 moved it back and rebuilt the regression
    # set from v1 before the promotion appended v3's probes: the set held a version not active.
    from services.registry import actions

    w = make_world()

    async def roll_back() -> None:
        await actions.rollback(w.ledger, "acme", 1, "sre", "v3 forgets", "r-1")

    roots, accepted = await _third_promotion_interleaved(w, roll_back)
    assert (await w.ledger.head("acme")).version == 1  # type: ignore[union-attr]
    assert accepted == {roots[0].feedback_id}


async def test_a_promotion_that_sees_a_newer_head_without_its_record_keeps_the_regression_set() -> None:
    # Another promotion moved the head to v4 and had not written v4's record yet: rebuilt from a
    # chain that did not exist, the set was written empty, and earlier feedback went unguarded.
    from services.registry.records import head_key

    w = make_world()

    async def another_replica_moves_on() -> None:
        await w.state.compare_and_set(
            KV_REGISTRY, head_key("acme"), ScopeHead,
            lambda h: h.model_copy(update={"version": 4, "latest_version": 4, "adapter_id": "ad-v4"}),
        )

    roots, accepted = await _third_promotion_interleaved(w, another_replica_moves_on)
    assert accepted == {r.feedback_id for r in roots}
