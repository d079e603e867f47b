"""Feedback listings walk the arrival index from its newest key: a long-lived scope's listing
reads what it returns, not the scope's whole history (the in-memory state; the KV semantics
are the same as on NATS, tests/test_registry_nats.py)."""

from __future__ import annotations

from datetime import timedelta

from test_registry_support import T0, World, feedback, make_world

from services.registry import handlers, queries
from services.registry.records import FeedbackRecord, feedback_key
from shared.subjects import KV_REGISTRY


async def scope_of(count: int, *, seconds_apart: float = 1.0) -> tuple[World, list[str]]:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    ids = []
    for i in range(count):
        sent = feedback(passage=f"Fact {i}.")
        sent = sent.model_copy(update={"occurred_at": T0 + timedelta(seconds=i)})  # the producer's clock
        await handlers.on_feedback_submitted(sent, w.ledger, "f" * 32)
        ids.append(sent.feedback_id)
        w.clock.advance(seconds_apart)
    return w, ids


def record_reads(w: World) -> list[str]:
    """The feedback records ``w``'s state is asked for from now on, one by one."""
    keys: list[str] = []
    read = w.state.read

    async def counted(bucket: str, key: str, model: type) -> object:
        if key.startswith("feedback."):
            keys.append(key)
        return await read(bucket, key, model)

    w.state.read = counted  # type: ignore[method-assign]
    return keys


async def set_state(w: World, feedback_id: str, state: str) -> None:
    key = feedback_key("acme", feedback_id)
    record = await w.state.read(KV_REGISTRY, key, FeedbackRecord)
    await w.state.put(KV_REGISTRY, key, record.model_copy(update={"state": state}))


def listed(rows: list[dict]) -> list[str]:
    return [row["feedback_id"] for row in rows]


async def test_a_listing_reads_the_newest_records_and_no_more() -> None:
    w, ids = await scope_of(30)
    assert listed(await queries.list_feedback(w.ledger, "acme")) == ids  # oldest first
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=5)) == ids[-5:]
    assert len(reads) == 5
    # A decided state found further back: read in growing batches, newest first, until enough match.
    for feedback_id in ids[20:23]:
        await set_state(w, feedback_id, "rejected")
    reads.clear()
    assert listed(await queries.list_feedback(w.ledger, "acme", "rejected", limit=2)) == ids[21:23]
    assert len(reads) == 2 + 4 + 8  # batches of 2, 4 and 8 from the newest: the third reaches ids[22] and ids[21]
    assert listed(await queries.list_feedback(w.ledger, "acme", "rejected")) == ids[20:23]
    assert await queries.list_feedback(w.ledger, "acme", "promoted") == []


async def test_feedback_that_arrived_together_is_ordered_by_when_it_was_sent() -> None:
    """One arrival stamp for all (a frozen clock): the whole group is read, and the producer's
    timestamps order it."""
    w, ids = await scope_of(8, seconds_apart=0)
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=3)) == ids[-3:]
    assert len(reads) == 8


async def test_records_from_before_the_index_are_indexed_on_the_first_listing() -> None:
    """A registry upgraded in place: its records have no arrival keys. The first listing of the
    scope adds them (one read of the scope's records); later listings walk the index."""
    w, ids = await scope_of(12)
    for bucket, key in list(w.state.data):
        if bucket == KV_REGISTRY and key.startswith(("arrived.acme.", "indexed.acme")) and not key.endswith(ids[-1]):
            del w.state.data[(bucket, key)]
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=4)) == ids[-4:]
    assert listed(await queries.list_feedback(w.ledger, "acme")) == ids
    assert sum(1 for b, k in w.state.data if b == KV_REGISTRY and k.startswith("arrived.acme.")) == 12
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=2)) == ids[-2:]
    assert len(reads) == 2
