"""Feedback listings walk the arrival index from its newest key: a long-lived scope's listing
reads what it returns, not the scope's whole history (the in-memory state; NatsState's key
listing is tested over a real server in tests/test_registry_nats.py)."""

from __future__ import annotations

from datetime import timedelta

from test_registry_support import T0, World, feedback, make_world

from services.registry import handlers, queries
from services.registry.records import FeedbackRecord, Marker, arrival_key, feedback_key
from shared.subjects import KV_REGISTRY


async def submit(w: World, i: int) -> str:
    sent = feedback(passage=f"Fact {i}.")
    sent = sent.model_copy(update={"occurred_at": T0 + timedelta(seconds=i)})  # the producer's clock
    await handlers.on_feedback_submitted(sent, w.ledger, "f" * 32)
    return sent.feedback_id


async def scope_of(count: int, *, seconds_apart: float = 1.0) -> tuple[World, list[str]]:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    ids = []
    for i in range(count):
        ids.append(await submit(w, i))
        w.clock.advance(seconds_apart)
    return w, ids


def record_reads(w: World) -> list[str]:
    """The feedback records ``w``'s state is asked for from now on, one by one, and (as
    ``"entries"``) every pass over a scope's records."""
    keys: list[str] = []
    read, entries = w.state.read, w.state.entries

    async def counted_read(bucket: str, key: str, model: type) -> object:
        if key.startswith("feedback."):
            keys.append(key)
        return await read(bucket, key, model)

    async def counted_entries(bucket: str, pattern: str, model: type, **kwargs: object) -> object:
        if pattern.startswith("feedback."):
            keys.append("entries")
        return await entries(bucket, pattern, model, **kwargs)

    w.state.read = counted_read  # type: ignore[method-assign]
    w.state.entries = counted_entries  # type: ignore[method-assign]
    return keys


async def set_state(w: World, feedback_id: str, state: str) -> None:
    key = feedback_key("acme", feedback_id)
    record = await w.state.read(KV_REGISTRY, key, FeedbackRecord)
    await w.state.put(KV_REGISTRY, key, record.model_copy(update={"state": state}))


def arrival_keys(w: World) -> list[str]:
    return [k for b, k in w.state.data if b == KV_REGISTRY and k.startswith("arrived.acme.")]


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


async def test_a_rare_state_is_read_in_one_pass_once_point_reads_add_up(monkeypatch) -> None:
    w, ids = await scope_of(30)
    for feedback_id in ids[:2]:
        await set_state(w, feedback_id, "rejected")
    monkeypatch.setattr(queries, "LISTING_BATCH", 2)
    monkeypatch.setattr(queries, "LISTING_POINT_READS", 4)
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", "rejected", limit=2)) == ids[:2]
    assert len(reads) == 6 + 1 and reads[-1] == "entries"  # point reads 2 at a time up to limit + 4, then one pass


async def test_feedback_that_arrived_together_is_ordered_by_when_it_was_sent() -> None:
    """One arrival stamp for all (a frozen clock): the whole group is read, and the producer's
    timestamps order it."""
    w, ids = await scope_of(8, seconds_apart=0)
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=3)) == ids[-3:]
    assert len(reads) == 8


async def test_records_without_an_arrival_key_get_one_and_are_listed() -> None:
    """Records from a registry before the index, or from an older replica during a rolling
    upgrade (after a newer one listed the scope): listed, and keyed so that the next listing
    reads no more than it returns."""
    w, ids = await scope_of(12)
    for key in arrival_keys(w):
        if not key.endswith(ids[-1]):
            del w.state.data[(KV_REGISTRY, key)]
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=4)) == ids[-4:]
    assert len(reads) == 11 + 1  # the 11 without a key (to key them), then the newest, which had one
    assert len(arrival_keys(w)) == 12
    reads.clear()
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=2)) == ids[-2:]
    assert len(reads) == 2
    # An older replica, still running, writes a record without a key: the next listing finds it.
    late = await submit(w, 12)
    for key in arrival_keys(w):
        if key.endswith(late):
            del w.state.data[(KV_REGISTRY, key)]
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=2)) == [ids[-1], late]
    assert len(arrival_keys(w)) == 13


async def test_a_second_arrival_key_from_a_race_does_not_hide_newer_feedback() -> None:
    """Two first events of one feedback raced: two arrival keys, the record first seen at the
    earlier one. A feedback that arrived in between is still the newest."""
    w = make_world()
    await w.set_policy("acme", candidates=1)
    raced = await submit(w, 0)
    w.clock.advance(0.002)
    between = await submit(w, 1)
    await w.state.put(KV_REGISTRY, arrival_key("acme", T0 + timedelta(seconds=0.005), raced), Marker(feedback_id=raced))
    await w.state.put(KV_REGISTRY, arrival_key("acme", T0 + timedelta(seconds=9), "ghost"), Marker(feedback_id="ghost"))
    reads = record_reads(w)
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=1)) == [between]
    assert listed(await queries.list_feedback(w.ledger, "acme", limit=2)) == [raced, between]
    assert "feedback.acme.ghost" not in reads  # an arrival key with no record is passed over
