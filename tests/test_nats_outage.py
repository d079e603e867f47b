"""A service rides out a NATS outage: its own nats-server, stopped and started again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from seal.stack import free_port, server_binary
from shared import events as ev
from shared.broker import create_broker, durable_subscriber, ensure_streams_at, publish_event
from shared.connections import NatsUnreachable, connect_nats
from shared.runtime import service_app
from shared.settings import NatsSettings
from shared.subjects import FEEDBACK_SUBMITTED, ConsumerSpec

pytestmark = pytest.mark.servers


class NatsServer:
    """One nats-server with JetStream on disk, to stop and start again on the same port and store,
    and to give users (``passwords``) whose configuration can be reloaded."""

    def __init__(self, store: Path) -> None:
        self.store, self.port, self.proc = store, free_port(), None
        self.config = store.parent / "nats.conf"
        self.passwords: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._write_config()
        self.proc = subprocess.Popen(
            [server_binary("nats-server"), "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def reload(self) -> None:
        """The configuration again, as an operator's rotation does (SIGHUP)."""
        self._write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def _write_config(self) -> None:
        users = ", ".join(f'{{user: "{user}", password: "{password}"}}' for user, password in self.passwords.items())
        self.config.write_text(
            f'listen: "127.0.0.1:{self.port}"\njetstream {{ store_dir: "{self.store}" }}\n'
            + (f"authorization {{ users = [ {users} ] }}\n" if users else "")
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

    app = service_app(broker)
    async with broker, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
        await broker.start()
        await publish_event(broker, feedback("fb-before"))
        assert await asyncio.wait_for(received.get(), 20) == "fb-before"

        nats_server.stop()
        await asyncio.sleep(4.0)  # 60 tries 0.02 s apart, each refused at once, take about 1.2 s
        assert not broker.connection.is_closed
        # Alive: a restart would not bring NATS back, and would end the work in progress.
        assert (await http.get("/healthz")).status_code == 204

        nats_server.start()
        await connected(settings)
        await publish_event(broker, feedback("fb-after"))
        assert await asyncio.wait_for(received.get(), 30) == "fb-after"


async def test_a_connection_nats_closed_for_good_fails_liveness_with_the_reason(nats_server) -> None:
    """Whatever the reconnect settings, NATS closes a connection whose credentials a configuration
    reload revoked; nothing comes through it again, so the process must be restarted."""
    nats_server.passwords = {"svc": "one", "kv": "one"}
    nats_server.stop()
    nats_server.start()
    settings = NatsSettings(url=nats_server.url, user="svc", password="one", events_max_bytes=2**26,
                            dead_letters_max_bytes=2**26)
    await connected(settings)
    own = await connect_nats(settings.model_copy(update={"user": "kv"}))
    broker = create_broker(settings, service="test")
    app = service_app(broker, connections=lambda: (own,))
    try:
        async with broker, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
            await broker.start()
            assert (await http.get("/healthz")).status_code == 204
            nats_server.passwords["kv"] = "two"  # rotated
            nats_server.reload()
            for _ in range(100):
                if own.is_closed:
                    break
                await asyncio.sleep(0.1)
            answer = await http.get("/healthz")
    finally:
        await own.close()
    assert answer.status_code == 500 and "closed" in answer.text and "Authorization" in answer.text, answer.text


async def test_the_first_connect_gives_up_and_says_what_nats_said(nats_server) -> None:
    """Reconnecting for ever makes nats-py try the first connect for ever too: a wrong password or
    address must end a tool or a service's start with the reason, not hang it."""
    nats_server.passwords = {"svc": "one"}
    nats_server.stop()
    nats_server.start()
    await connected(NatsSettings(url=nats_server.url, user="svc", password="one"))
    wrong = NatsSettings(url=nats_server.url, user="svc", password="two", first_connect_timeout_s=1.0)
    with pytest.raises(NatsUnreachable, match="Authorization"):
        await asyncio.wait_for(connect_nats(wrong), 15)
    nobody = NatsSettings(url=f"nats://127.0.0.1:{free_port()}", first_connect_timeout_s=1.0)
    with pytest.raises(NatsUnreachable, match=f"no connection to NATS at {nobody.url} in 1 s"):
        await asyncio.wait_for(connect_nats(nobody), 15)
    app = service_app(create_broker(nobody, service="test"))
    with pytest.raises(NatsUnreachable, match="in 1 s: .*Connect call failed"):  # a service's start
        await asyncio.wait_for(app.start(), 15)
    app = service_app(create_broker(wrong, service="test"))
    with pytest.raises(NatsUnreachable, match="refused the connection: .*Authorization"):
        await asyncio.wait_for(app.start(), 15)


async def test_a_consumer_jetstream_lost_fails_liveness_with_its_name(nats_server) -> None:
    """FastStream makes a durable consumer when it subscribes, never again: one deleted by hand (or
    lost with the server's store) leaves the replica taking nothing until it restarts."""
    settings = NatsSettings(url=nats_server.url, events_max_bytes=2**26, dead_letters_max_bytes=2**26)
    await connected(settings)
    broker = create_broker(settings, service="test")

    @durable_subscriber(broker, ConsumerSpec("test-lost", FEEDBACK_SUBMITTED))
    async def on_feedback(event: ev.FeedbackSubmitted) -> None:
        pass

    app = service_app(broker)
    async with broker, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
        await broker.start()
        assert (await http.get("/healthz")).status_code == 204
        await broker.config.connection_state.stream.delete_consumer("SEAL_EVENTS", "test-lost")
        answer = await http.get("/healthz")
    assert answer.status_code == 500 and "SEAL_EVENTS/test-lost" in answer.text, answer.text


async def test_a_connection_that_stopped_reconnecting_or_stays_down_fails_liveness(nats_server) -> None:
    """NATS restarted with another password for the service's user: FastStream ends nats-py's
    reconnecting on the refusal, and the connection is left neither closed nor connected nor
    trying. And a connection that keeps trying, down past ``max_disconnected_s``, fails too."""
    nats_server.passwords = {"svc": "one"}
    nats_server.stop()
    nats_server.start()
    settings = NatsSettings(url=nats_server.url, user="svc", password="one", reconnect_wait_s=0.05,
                            events_max_bytes=2**26, dead_letters_max_bytes=2**26)
    await connected(settings)
    broker = create_broker(settings, service="test")
    app = service_app(broker)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
            await broker.start()
            assert (await http.get("/healthz")).status_code == 204
            nats_server.stop()
            nats_server.passwords["svc"] = "two"
            nats_server.start()
            for _ in range(100):
                answer = await http.get("/healthz")
                if answer.status_code != 204:
                    break
                await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):  # its connection is in no state to drain
            await broker.stop()
    assert answer.status_code == 500 and "stopped reconnecting" in answer.text, answer.text

    nats_server.passwords["svc"] = "one"
    nats_server.stop()
    nats_server.start()
    await connected(settings)
    patient = create_broker(settings.model_copy(update={"max_disconnected_s": 1.0}), service="test")
    app = service_app(patient)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as http:
            await patient.start()
            nats_server.stop()
            for _ in range(100):  # until the client has noticed
                if not patient.connection.is_connected:
                    break
                await asyncio.sleep(0.1)
            first = await http.get("/healthz")  # down, and trying: alive
            await asyncio.sleep(1.5)
            later = await http.get("/healthz")
    finally:
        with contextlib.suppress(Exception):  # no NATS to drain to
            await patient.stop()
    assert first.status_code == 204, first.text
    assert later.status_code == 500 and "has been down" in later.text, later.text
