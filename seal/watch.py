"""Following the platform from outside: submit feedback, watch what becomes of it.

Used by the demo, the benchmarks and the end-to-end test. It talks to NATS
directly (no service code): it publishes ``feedback.submitted`` and reads
every event of the ``SEAL_EVENTS`` stream through an ephemeral ordered
consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy

from shared import events as ev
from shared.connections import connect_nats
from shared.settings import NatsSettings
from shared.subjects import EVENTS_PREFIX, subject_for

FINAL = (ev.FeedbackDecided, ev.AdapterPromoted, ev.AdapterAwaitingApproval, ev.FeedbackRejected)
PUBLISH_ATTEMPTS = 5


@dataclass
class FeedbackProgress:
    """What happened so far to one feedback, built from its events."""

    feedback_id: str
    events: list[ev.Event] = field(default_factory=list)

    def of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def candidates(self) -> int:
        counts = [e.self_edit.candidate_count for e in self.of(ev.SelfEditGenerated)]  # type: ignore[attr-defined]
        counts += [e.candidate_count for e in self.of(ev.SelfEditRejected)]  # type: ignore[attr-defined]
        return max(counts, default=0)

    @property
    def decided(self) -> bool:
        """Promoted, held for approval, feedback rejected, or every candidate rejected.

        The registry publishes one ``adapter.rejected`` per losing candidate,
        some while the winner is still being rebased, so one is not the end.
        """
        if any(isinstance(e, FINAL) for e in self.events):
            return True
        rejected = {e.self_edit_id for e in self.of(ev.AdapterRejected)}  # type: ignore[attr-defined]
        return self.candidates > 0 and len(rejected) >= self.candidates

    def stage(self) -> str:
        if self.of(ev.FeedbackRejected):
            return "feedback rejected"
        if decided := self.of(ev.FeedbackDecided):
            end = decided[-1]
            return f"promoted v{end.version}" if end.outcome == "promoted" else "rejected"  # type: ignore[attr-defined]
        if promoted := self.of(ev.AdapterPromoted):
            return f"promoted v{promoted[-1].version}"  # type: ignore[attr-defined]
        if self.of(ev.AdapterAwaitingApproval):
            return "awaiting approval"
        if self.decided:
            return "rejected"
        if self.of(ev.RebaseRequested):
            return "rebasing"
        evaluated = len(self.of(ev.AdapterEvaluated)) + len(self.of(ev.AdapterEvaluationFailed))
        trained = len(self.of(ev.AdapterTrained)) + len(self.of(ev.AdapterTrainingFailed))
        generated = len(self.of(ev.SelfEditGenerated))
        if evaluated:
            return f"evaluated {evaluated}/{generated}"
        if trained:
            return f"trained {trained}/{generated}"
        if generated or self.of(ev.SelfEditRejected):
            return f"{generated} self-edits ({len(self.of(ev.SelfEditRejected))} rejected)"
        return "generating"


class PlatformWatcher:
    """Publish feedback and iterate over every platform event from now on."""

    def __init__(self, settings: NatsSettings):
        self.settings = settings
        self.nc: nats.NATS | None = None
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.progress: dict[str, FeedbackProgress] = {}

    async def __aenter__(self) -> "PlatformWatcher":
        self.nc = await connect_nats(self.settings)
        js = self.nc.jetstream()
        await js.subscribe(
            f"{EVENTS_PREFIX}.>", cb=self._on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def _on_message(self, msg: nats.aio.msg.Msg) -> None:
        try:
            event = ev.parse_event(msg.data)
        except ev.EventValidationError:
            return
        self.progress.setdefault(event.feedback_id, FeedbackProgress(event.feedback_id)).events.append(event)
        await self.queue.put(event)

    async def submit(self, event: ev.FeedbackSubmitted, attempts: int = PUBLISH_ATTEMPTS) -> None:
        """Publish a feedback event. A publish the server does not confirm in time (a busy
        machine, a reconnect) is sent again: JetStream drops a copy by its message id, the event
        id, so the feedback goes in once. The last failure is raised."""
        assert self.nc is not None, "use PlatformWatcher as an async context manager"
        self.progress.setdefault(event.feedback_id, FeedbackProgress(event.feedback_id))
        for attempt in range(1, attempts + 1):
            try:
                await self.nc.jetstream().publish(
                    subject_for(event), event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id}
                )
                return
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                if attempt == attempts:
                    raise
                await asyncio.sleep(attempt)

    async def events(self) -> AsyncIterator[ev.Event]:
        while True:
            yield await self.queue.get()

    async def wait_until(
        self, done: Callable[[], bool], timeout: float, on_event: Callable[[ev.Event], None] | None = None, poll_s: float = 2.0
    ) -> None:
        """Consume events until ``done()`` holds; TimeoutError after ``timeout`` seconds. ``done`` is
        asked after each event and every ``poll_s`` seconds without one (it may watch more than events)."""

        async def loop() -> None:
            while not done():
                try:
                    event = await asyncio.wait_for(self.queue.get(), poll_s)
                except TimeoutError:
                    continue
                if on_event is not None:
                    on_event(event)

        await asyncio.wait_for(loop(), timeout)
