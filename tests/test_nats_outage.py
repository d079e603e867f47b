"""A service rides out a NATS outage: its own nats-server, stopped and started again."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from seal.stack import free_port, server_binary
from shared import events as ev
from shared.broker import create_broker, durable_subscriber, ensure_streams_at, publish_event
from shared.settings import NatsSettings
from shared.subjects import FEEDBACK_SUBMITTED, ConsumerSpec

pytestmark = pytest.mark.servers


class NatsServer:
    """One nats-server with JetStream on disk, to stop and start again on the same port and store."""

    def __init__(self, store: Path) -> None:
        self.store, self.port, self.proc = store, free_port(), None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [server_binary("nats-server"), "--jetstream", "--store_dir", str(self.store),
             "--addr", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def connected(settings: NatsSettings, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await ensure_streams_at(settings)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def test_a_service_takes_messages_again_after_nats_was_away_longer_than_the_client_default(nats_server) -> None:
    """nats-py gives up after 60 tries and closes the connection for good. A closed connection's pull
    consumer then loops without ever yielding (FastStream suppresses the error and fetches again), so
    the whole event loop stops: no message, no health answer, no graceful shutdown. Services try for
    ever instead. The service runs on a thread of its own, so that a frozen loop fails this test
    rather than hanging it."""
    outcome: list[BaseException | None] = []
    runner = threading.Thread(target=lambda: outcome.append(_outage(nats_server)), daemon=True)
    runner.start()
    runner.join(90)
    assert outcome, "the service's event loop froze during the outage, or never took the message after it"
    if outcome[0] is not None:
        raise outcome[0]


def _outage(nats_server: NatsServer) -> BaseException | None:
    try:
        asyncio.run(_ride_out_an_outage(nats_server))
    except BaseException as exc:  # noqa: BLE001 - handed to the test's own thread
        return exc
    return None


async def _ride_out_an_outage(nats_server: NatsServer) -> None:
    settings = NatsSettings(url=nats_server.url, reconnect_wait_s=0.02, events_max_bytes=2**26,
                            dead_letters_max_bytes=2**26)
    await connected(settings)
    broker = create_broker(settings, service="test")
    received: asyncio.Queue[str] = asyncio.Queue()

    @durable_subscriber(broker, ConsumerSpec("test-outage", FEEDBACK_SUBMITTED))
    async def on_feedback(event: ev.FeedbackSubmitted) -> None:
        await received.put(event.feedback_id)

    def feedback(fid: str) -> ev.FeedbackSubmitted:
        return ev.FeedbackSubmitted(feedback_id=fid, scope="acme",
                                    content=ev.KnowledgeFeedback(passage="Quellmoor received its charter in 1387."))

    async with broker:
        await broker.start()
        await publish_event(broker, feedback("fb-before"))
        assert await asyncio.wait_for(received.get(), 20) == "fb-before"

        nats_server.stop()
        await asyncio.sleep(4.0)  # 60 tries 0.02 s apart, each refused at once, take about 1.2 s
        assert not broker.connection.is_closed

        nats_server.start()
        await connected(settings)
        await publish_event(broker, feedback("fb-after"))
        assert await asyncio.wait_for(received.get(), 30) == "fb-after"
