"""Two registry writers at once: a rollback's rebuild of the regression set against a promotion,
and two replicas promoting the same feedback. In memory, with the interleaving forced."""

from __future__ import annotations

import asyncio
from typing import Any

from test_registry_support import Bus, FakeManifests, evaluated, feedback, make_world

from services.registry import actions, handlers
from services.registry.ledger import Ledger
from services.registry.ports import Ports
from services.registry.records import FeedbackRecord, ScopeHead, VersionRecord, feedback_key, head_key, version_key
from shared import events as ev
from shared.registry_view import AcceptedProbes, probes_key
from shared.subjects import KV_REGISTRY


def fact(i: int, parent: int | None) -> ev.FeedbackSubmitted:
    base = feedback(feedback_id=f"fb{i}")
    return base.model_copy(update={"content": ev.KnowledgeFeedback(
        passage=f"Fact {i} of the scope.", probes=(ev.Probe(question=f"What is fact {i}?", answer=f"answer {i}"),))})


async def promote(w: Any, i: int, parent: int | None) -> FeedbackRecord:
    """Feedback ``fb<i>``, its three candidates trained on ``parent``, the first promoted."""
    f = fact(i, parent)
    await handlers.on_feedback_submitted(f, w.ledger, None)
    for index in range(3):
        await handlers.on_adapter_evaluated(evaluated(f, index, 3, reward=0.1 if index == 0 else 0.05,
                                                      parent_version=parent), w.ledger)
    record = await w.ledger.record("acme", f.feedback_id)
    assert record is not None and record.state == "promoted", record
    return record


async def guarded(w: Any) -> set[str]:
    probes = await w.state.read(KV_REGISTRY, probes_key("acme"), AcceptedProbes)
    return {feedback_id for feedback_id, _ in probes.probes}


async def test_a_promotion_during_a_rollbacks_rebuild_keeps_its_probes() -> None:
    """v3 is rolled back to v2; meanwhile fb4, trained on v2, is promoted as v4 while the rollback
    reads v2's chain. The regression set must guard fb4 too: before, the rollback wrote v2's set
    over it, and later updates could erase what fb4 taught with no gate noticing."""
    w = make_world()
    await promote(w, 1, None)
    await promote(w, 2, 1)
    await promote(w, 3, 2)
    read, raced, started = w.state.read, [], asyncio.Event()

    async def racing_read(bucket: str, key: str, model: Any) -> Any:
        if key == version_key("acme", 2) and not started.is_set():
            head = await read(KV_REGISTRY, head_key("acme"), ScopeHead)
            if head is None or head.version != 2:  # the rollback reading its target, before it moves the head
                return await read(bucket, key, model)
            started.set()  # the rollback's rebuild, walking v2's chain
            raced.append(await promote(w, 4, 2))
        return await read(bucket, key, model)

    w.state.read = racing_read
    await actions.rollback(w.ledger, "acme", 2, "sre-alice", "v3 answers wrong", "req-1")
    w.state.read = read

    assert raced and raced[0].version == 4
    head = await w.ledger.head("acme")
    assert head is not None and head.version == 4
    assert await guarded(w) == {"fb1", "fb2", "fb4"}  # v4 stands on v2: fb3's probes are out, fb4's in


async def test_a_rollback_rebuilds_from_the_head_as_it_is_when_it_runs() -> None:
    w = make_world()
    await promote(w, 1, None)
    await promote(w, 2, 1)
    rebuild = w.ledger.rebuild_probes

    async def late(scope: str) -> None:  # fb3 lands between the rollback's head move and its rebuild
        await promote(w, 3, 1)
        await rebuild(scope)

    w.ledger.rebuild_probes = late  # type: ignore[method-assign]
    await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v2 answers wrong", "req-2")
    assert (await w.ledger.head("acme")).version == 3  # type: ignore[union-attr]
    assert await guarded(w) == {"fb1", "fb3"}


async def test_a_rollbacks_rebuild_while_a_promotion_has_not_written_its_version_yet() -> None:
    """The rollback to v2 reads the head when fb4 (trained on v2) has moved it to v4 but not yet
    written v4's record: the rollback writes nothing then, and fb4's own rebuild, once its record
    is written, leaves out the rolled-back fb3 and guards fb4."""
    w = make_world()
    await promote(w, 1, None)
    await promote(w, 2, 1)
    await promote(w, 3, 2)
    rebuild, put = w.ledger.rebuild_probes, w.state.put
    paused, resume = asyncio.Event(), asyncio.Event()

    async def pausing_put(bucket: str, key: str, value: Any) -> None:
        if key == version_key("acme", 4):
            paused.set()
            await resume.wait()
        await put(bucket, key, value)

    async def racing(scope: str) -> None:
        w.state.put = pausing_put
        fb4 = asyncio.create_task(promote(w, 4, 2))
        await paused.wait()  # fb4 moved the head to v4; its record is not written
        await rebuild(scope)
        resume.set()
        await fb4

    w.ledger.rebuild_probes = racing  # type: ignore[method-assign]
    await actions.rollback(w.ledger, "acme", 2, "sre-alice", "v3 answers wrong", "req-3")
    w.state.put = put
    assert (await w.ledger.head("acme")).version == 4  # type: ignore[union-attr]
    assert await guarded(w) == {"fb1", "fb2", "fb4"}


async def test_a_replica_that_finds_the_adapter_gone_leaves_another_replicas_promotion_standing() -> None:
    """Replica A has read the chosen adapter and is about to move the head; replica B finds the
    adapter unreadable (deleted meanwhile), sees no head yet, and sends the feedback back to be
    decided. A's head move lands after: the head is the commit point, so the feedback ends
    promoted. Before, it ended rejected (or held) with its adapter serving as the active version."""
    w = make_world()
    await w.set_policy("acme", approval="manual")
    f = feedback(feedback_id="F")
    await handlers.on_feedback_submitted(f, w.ledger, None)
    for index in range(3):
        await handlers.on_adapter_evaluated(evaluated(f, index, 3, reward=0.1 if index == 0 else 0.05), w.ledger)
    held = await w.ledger.record("acme", "F")
    assert held is not None and held.state == "awaiting_approval"
    chosen = held.candidate(0)
    assert chosen is not None
    # Approved: the record is ``promoting`` (as actions.approve leaves it), not yet settled.
    await w.state.compare_and_set(KV_REGISTRY, feedback_key("acme", "F"), FeedbackRecord, lambda c: c.model_copy(
        update={"state": "promoting", "decided_by": "alice", "hold": None, "reasons": ()}))

    b_manifests, b_bus = FakeManifests(), Bus()
    b_manifests.missing.add(chosen.adapter_id)  # deleted (or damaged) right after A read it
    b = Ledger(Ports(state=w.state, publish=b_bus, manifests=b_manifests, clock=w.clock, trace_id=lambda: None),
               w.ledger.config)
    cas, paused, resume = w.state.compare_and_set, asyncio.Event(), asyncio.Event()

    async def pausing_cas(bucket: str, key: str, model: Any, change: Any, **kwargs: Any) -> Any:
        if key == head_key("acme") and not paused.is_set():  # A: the manifest read, the head move next
            paused.set()
            await resume.wait()
        return await cas(bucket, key, model, change, **kwargs)

    w.state.compare_and_set = pausing_cas  # type: ignore[method-assign]
    a = asyncio.create_task(w.ledger.settle("acme", "F"))
    await paused.wait()
    await b.settle("acme", "F")
    assert (await w.ledger.record("acme", "F")).state != "promoting"  # type: ignore[union-attr]  # B sent it back
    resume.set()
    await a
    w.state.compare_and_set = cas  # type: ignore[method-assign]

    record = await w.ledger.record("acme", "F")
    head = await w.ledger.head("acme")
    assert head is not None and head.version == 1 and head.adapter_id == chosen.adapter_id
    assert record is not None and record.state == "promoted" and record.version == 1, record
    decided = [e for e in (*w.bus.events, *b_bus.events) if isinstance(e, ev.FeedbackDecided)]
    assert decided and {e.outcome for e in decided} == {"promoted"}, [(e.outcome, e.reasons) for e in decided]


async def test_a_replica_that_cannot_read_an_active_adapter_keeps_the_version_record_written_by_one_that_could() -> None:
    w = make_world()
    record = await promote(w, 1, None)
    full = await w.state.read(KV_REGISTRY, version_key("acme", 1), VersionRecord)
    assert full is not None and full.base_model == "tiny"
    # A re-run of the promotion (the sweep, after a crash before the record said "promoted") by a
    # replica whose store read fails now.
    await w.state.compare_and_set(KV_REGISTRY, feedback_key("acme", "fb1"), FeedbackRecord,
                                  lambda c: c.model_copy(update={"state": "promoting", "version": None}))
    chosen = record.candidate(record.chosen)  # type: ignore[arg-type]
    w.manifests.missing.add(chosen.adapter_id)  # type: ignore[union-attr]
    await w.ledger.settle("acme", "fb1")
    assert (await w.ledger.record("acme", "fb1")).state == "promoted"  # type: ignore[union-attr]
    assert await w.state.read(KV_REGISTRY, version_key("acme", 1), VersionRecord) == full
