"""PlatformWatcher.submit: a publish the server does not confirm is sent again, under the same id."""

from __future__ import annotations

from types import SimpleNamespace

import nats.errors
import pytest

from seal import watch
from seal.watch import PlatformWatcher
from shared import events as ev


class FlakyJetStream:
    def __init__(self, failures: int):
        self.failures = failures
        self.calls: list[dict[str, str]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.calls.append(headers)
        if len(self.calls) <= self.failures:
            raise nats.errors.TimeoutError


def watcher_over(js: FlakyJetStream) -> PlatformWatcher:
    watcher = PlatformWatcher(settings=None)  # type: ignore[arg-type]
    watcher.nc = SimpleNamespace(jetstream=lambda: js)  # type: ignore[assignment]
    return watcher


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def instant(_seconds: float) -> None:
        return None

    monkeypatch.setattr(watch.asyncio, "sleep", instant)


def feedback() -> ev.FeedbackSubmitted:
    return ev.FeedbackSubmitted(feedback_id=ev.new_id(), scope="s", content=ev.KnowledgeFeedback(passage="A fact."))


async def test_an_unconfirmed_publish_is_sent_again_with_the_same_message_id() -> None:
    js = FlakyJetStream(failures=2)
    event = feedback()
    await watcher_over(js).submit(event)
    assert [h["Nats-Msg-Id"] for h in js.calls] == [event.event_id] * 3


async def test_it_gives_up_after_its_attempts_with_the_last_error() -> None:
    js = FlakyJetStream(failures=10)
    with pytest.raises(nats.errors.TimeoutError):
        await watcher_over(js).submit(feedback(), attempts=3)
    assert len(js.calls) == 3


async def test_waiting_looks_again_without_events() -> None:
    """A wait also ends on what no event announces (the demo's check that its services still
    run): ``done`` is asked every ``poll_s`` seconds, not only after an event."""
    import time

    from seal.watch import PlatformWatcher
    from shared.settings import NatsSettings

    watcher = PlatformWatcher(NatsSettings())  # never connected: no event will come
    ready_at = time.monotonic() + 0.2
    started = time.monotonic()
    await watcher.wait_until(lambda: time.monotonic() >= ready_at, timeout=10, poll_s=0.05)
    assert time.monotonic() - started < 2
