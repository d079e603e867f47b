"""One feedback is written once: the generator's claim on a feedback across deliveries and replicas."""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_generator_service import ScriptedWriter, knowledge, make_ports, payload

from services.generator.handlers import handle_feedback
from services.generator.settings import GeneratorConfig
from shared import events as ev


class SlowWriter(ScriptedWriter):
    """Writes once ``release`` is set (at most 10 s), noting each writing's seed in ``started``."""

    def __init__(self) -> None:
        super().__init__()
        self.release, self.started = threading.Event(), []

    def write(self, prompts, *, seed, adapter=None):  # noqa: ANN001, ANN201
        self.started.append(seed)
        self.release.wait(10)
        return super().write(prompts, seed=seed, adapter=adapter)


async def test_two_deliveries_of_one_feedback_on_two_replicas_are_written_once() -> None:
    """A product published its feedback again under a new event id, and another replica took it
    while the first was still writing: it waits for the first, then publishes nothing of its own."""
    writer = SlowWriter()
    release, started = writer.release, writer.started
    ports, published = make_ports(writer=writer)
    config = GeneratorConfig(claim_poll_s=0.01)
    feedback = knowledge()
    retried = feedback.model_copy(update={"event_id": ev.new_id()})
    first = asyncio.create_task(handle_feedback(payload(feedback), ports, config))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(handle_feedback(payload(retried), ports, config))
    await asyncio.sleep(0.2)
    assert len(started) == 1 and not second.done()  # waiting, not writing
    release.set()
    wrote, waited = await asyncio.gather(first, second)
    assert len(started) == 1 and not wrote.duplicate and waited.duplicate
    assert len(published) == len(wrote.events) == 9


async def test_a_delivery_whose_writing_failed_lets_a_waiting_one_go_on_at_once() -> None:
    class FailingOnce(ScriptedWriter):
        def write(self, prompts, *, seed, adapter=None):  # noqa: ANN001, ANN201
            if not self.calls:
                self.calls.append(([], -1))
                raise ConnectionError("object store unreachable")
            return super().write(prompts, seed=seed, adapter=adapter)

    ports, published = make_ports(writer=FailingOnce())
    feedback = knowledge()
    config = GeneratorConfig(claim_poll_s=30, claim_stale_s=600)  # a wait would outlast the test
    with pytest.raises(ConnectionError):
        await handle_feedback(payload(feedback), ports, config)
    assert await ports.ledger.recall(feedback.scope, feedback.feedback_id) is None  # the claim is given up
    retried = feedback.model_copy(update={"event_id": ev.new_id()})
    outcome = await asyncio.wait_for(handle_feedback(payload(retried), ports, config), 10)
    assert not outcome.duplicate and len(published) == 9


async def test_a_shutdown_ends_a_wait_for_another_delivery_at_once() -> None:
    """Waiting for another delivery's writing, the generator is told to stop: the delivery goes
    back at once (Interrupted), before its next call on a connection that is closing."""
    from services.generator.state import LedgerEntry
    from shared.shutdown import Interrupted

    writer = ScriptedWriter()
    writer.stopping = threading.Event()  # type: ignore[attr-defined]
    ports, published = make_ports(writer=writer)
    feedback = knowledge()
    ports.ledger.entries[(feedback.scope, feedback.feedback_id)] = LedgerEntry.writing("evt-of-the-other-replica")  # type: ignore[attr-defined]
    waiting = asyncio.create_task(handle_feedback(payload(feedback), ports, GeneratorConfig(claim_poll_s=30)))
    await asyncio.sleep(0.2)
    writer.stopping.set()  # type: ignore[attr-defined]
    with pytest.raises(Interrupted):
        await asyncio.wait_for(waiting, 3)
    assert published == [] and writer.calls == []


async def test_a_claim_whose_writer_died_is_taken_over() -> None:
    from datetime import UTC, datetime, timedelta

    from services.generator.state import LedgerEntry

    ports, published = make_ports()
    feedback = knowledge()
    dead = LedgerEntry("writing", writer="evt-of-a-dead-replica", at=datetime.now(UTC) - timedelta(hours=1))
    ports.ledger.entries[(feedback.scope, feedback.feedback_id)] = dead  # type: ignore[attr-defined]
    outcome = await handle_feedback(payload(feedback), ports, GeneratorConfig(claim_stale_s=600))
    assert not outcome.duplicate and len(published) == 9


async def test_a_long_writing_renews_its_claim() -> None:
    """A writing that outlasts claim_stale_s is not taken for a dead one: its claim is renewed."""
    writer = SlowWriter()
    release = writer.release
    ports, published = make_ports(writer=writer)
    config = GeneratorConfig(claim_poll_s=0.01, claim_stale_s=1.5)  # renewed every 0.5 s
    feedback = knowledge()
    writing = asyncio.create_task(handle_feedback(payload(feedback), ports, config))
    await asyncio.sleep(3.0)  # twice the time after which an unrenewed claim is stale
    held = await ports.ledger.claim(feedback.scope, feedback.feedback_id, "evt-of-another-delivery", 1.5)
    assert held is not None and held.status == "writing" and held.writer == feedback.event_id
    release.set()
    assert not (await writing).duplicate


async def test_two_messages_of_one_feedback_under_one_event_id_are_still_written_once() -> None:
    """A product published the same feedback twice without an event id: both messages carry the
    derived one. Each message is told apart by its stream sequence, so the second does not take
    the first one's claim for its own and write beside it."""
    writer = SlowWriter()
    release, started = writer.release, writer.started
    ports, published = make_ports(writer=writer)
    config = GeneratorConfig(claim_poll_s=0.01)
    feedback = knowledge()
    first = asyncio.create_task(handle_feedback(payload(feedback), ports, config, delivery="41"))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(handle_feedback(payload(feedback), ports, config, delivery="42"))
    await asyncio.sleep(0.2)
    assert len(started) == 1 and not second.done()  # waiting, not writing
    release.set()
    wrote, waited = await asyncio.gather(first, second)
    assert len(started) == 1 and not wrote.duplicate and waited.duplicate
    assert len(published) == len(wrote.events)


async def test_a_writing_whose_claim_was_taken_over_publishes_nothing() -> None:
    """Its renewals failed, its claim went stale and another delivery took it over: publishing
    this writing too would send a second set of candidates for one feedback."""
    from services.generator.state import LedgerEntry

    writer = SlowWriter()
    release = writer.release
    ports, published = make_ports(writer=writer)
    feedback = knowledge()
    writing = asyncio.create_task(handle_feedback(payload(feedback), ports, GeneratorConfig(), delivery="7"))
    await asyncio.sleep(0.2)
    ports.ledger.entries[(feedback.scope, feedback.feedback_id)] = LedgerEntry.writing("another@8")  # type: ignore[attr-defined]
    release.set()
    outcome = await writing
    assert outcome.duplicate and published == []
    assert ports.ledger.entries[(feedback.scope, feedback.feedback_id)].writer == "another@8"  # type: ignore[attr-defined]
