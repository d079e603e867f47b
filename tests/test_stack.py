"""The embedded stack: starts, answers, stops, and finds its data again."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats
import pytest

from seal.stack import LocalStack, StackPorts
from shared.broker import ensure_streams_at
from shared.store import AdapterStore
from shared.subjects import EVENTS_STREAM, FEEDBACK_SUBMITTED

pytestmark = pytest.mark.servers


async def _publish_and_count(url: str, publish: bool) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if publish:
            await js.publish(FEEDBACK_SUBMITTED, b"{}", headers={"Nats-Msg-Id": "persist-1"})
        return (await js.stream_info(EVENTS_STREAM)).state.messages
    finally:
        await nc.close()


def test_restart_keeps_streams_and_objects(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "home", StackPorts.free())
    with stack:
        assert stack.nats_healthy() and stack.s3_healthy()
        asyncio.run(ensure_streams_at(stack.nats_settings()))
        store = AdapterStore.from_settings(stack.store_settings())
        store.ensure_bucket()
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "adapter_config.json").write_text("{}")
        from shared.store import AdapterManifest

        ref = store.put_adapter(tmp_path / "a", AdapterManifest(adapter_id="kept", scope="acme", base_model="tiny"))
        assert asyncio.run(_publish_and_count(stack.nats_url, True)) == 1
    assert not stack.nats_healthy()
    with LocalStack(tmp_path / "home", stack.ports) as again:
        assert asyncio.run(_publish_and_count(again.nats_url, False)) == 1
        assert AdapterStore.from_settings(again.store_settings()).exists(ref.uri)


def test_busy_port_is_reported(tmp_path: Path, stack: LocalStack) -> None:
    clash = LocalStack(tmp_path / "other", StackPorts(**{**vars(StackPorts.free()), "nats": stack.ports.nats}))
    with pytest.raises(RuntimeError, match=f"nats={stack.ports.nats}"):
        clash.start()


def test_a_second_set_of_services_gets_ports_nobody_listens_on() -> None:
    import socket

    from seal.processes import SERVICE_PORT_BASE, SERVICES, free_service_port_base
    from seal.stack import port_is_free

    with socket.socket() as held:  # a port in use must never be handed out
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        for _ in range(20):
            base = free_service_port_base()
            ports = range(base, base + len(SERVICES))
            assert taken not in ports and all(port_is_free(p) for p in ports)
    assert SERVICE_PORT_BASE == 18080  # the documented ports of `seal up` and the demo stay put


def test_ports_for_tests_come_from_below_the_ephemeral_range_and_skip_ports_in_use(monkeypatch) -> None:
    """A port from the ephemeral range could become an outgoing connection's source port before the
    server that wanted it binds it (weed's parts connect to each other while they start)."""
    import socket
    from types import SimpleNamespace

    from seal import stack

    low = stack.ephemeral_ports()[0]
    for _ in range(20):
        assert stack.LOWEST_CHOSEN_PORT <= stack.free_port() < low
        assert stack.free_admin_port() + stack.ADMIN_GRPC_OFFSET < low
    with socket.socket() as held:
        held.bind(("127.0.0.1", stack.free_port()))
        held.listen()
        taken = held.getsockname()[1]
        offered = iter([taken, taken + 1, taken + 2])
        monkeypatch.setattr(stack, "random", SimpleNamespace(randrange=lambda *_: next(offered)))
        chosen = stack.free_port()
    assert chosen != taken and chosen in (taken + 1, taken + 2)


def test_sigterm_runs_the_cleanup_that_stops_the_services(tmp_path: Path) -> None:
    import sys

    marker = tmp_path / "stopped"
    script = (
        "import os, signal, time\n"
        "from seal.processes import stop_on_sigterm\n"
        "stop_on_sigterm()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').write('services stopped')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, timeout=60)
    assert done.returncode == 143
    assert marker.read_text() == "services stopped"


def test_the_events_and_dead_letters_keep_within_their_byte_limits(tmp_path: Path) -> None:
    """A flood of dead letters drops the oldest ones at the stream's limit instead of filling
    JetStream's volume (and stopping the whole bus); the audit stream has no such limit."""

    from shared.broker import ensure_streams
    from shared.settings import NatsSettings
    from shared.subjects import AUDIT_STREAM, DLQ_PREFIX, DLQ_STREAM

    port, server = jetstream_server(tmp_path)

    async def flood() -> None:
        nc = await connected(port)
        try:
            js = nc.jetstream()
            await ensure_streams(js, NatsSettings(dead_letters_max_bytes=2**20))
            first = await js.publish(f"{DLQ_PREFIX}.generator.seal.events.feedback.submitted", b"x" * 200_000)
            for _ in range(9):
                await js.publish(f"{DLQ_PREFIX}.generator.seal.events.feedback.submitted", b"x" * 200_000)
            info = await js.stream_info(DLQ_STREAM)
            assert info.state.bytes <= 2**20 and info.state.first_seq > first.seq  # the oldest went
            assert (await js.stream_info(EVENTS_STREAM)).config.max_bytes == NatsSettings().events_max_bytes
            assert (await js.stream_info(AUDIT_STREAM)).config.max_bytes in (-1, None)
            await ensure_streams(js)  # the next start with the defaults raises the limit again
            assert (await js.stream_info(DLQ_STREAM)).config.max_bytes == 2**30
        finally:
            await nc.close()

    try:
        asyncio.run(flood())
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_local_stack_asks_its_streams_for_little_disk(tmp_path: Path) -> None:
    """JetStream reserves each stream's byte limit when it is made: with the production limits a stack
    on a small disk would not start. The services the stack runs take the same small limits."""
    from shared.settings import NatsSettings

    stack = LocalStack(tmp_path, StackPorts.free())
    settings = stack.nats_settings()
    assert settings.events_max_bytes + settings.dead_letters_max_bytes <= 2**30 < NatsSettings().events_max_bytes
    env = stack.env()
    assert int(env["SEAL_NATS__EVENTS_MAX_BYTES"]) == settings.events_max_bytes
    assert int(env["SEAL_NATS__DEAD_LETTERS_MAX_BYTES"]) == settings.dead_letters_max_bytes


def test_a_limit_the_servers_store_cannot_reserve_leaves_the_streams_as_they_are(tmp_path: Path) -> None:
    """A service started by hand (the production limits) against a developer's stack whose JetStream
    store is small: it starts, and the streams keep the limits they have."""

    from shared.broker import ensure_streams
    from shared.settings import NatsSettings
    from shared.subjects import DLQ_STREAM

    port, server = jetstream_server(tmp_path, "max_file_store: 1GB")

    async def start_twice() -> None:
        nc = await connected(port)
        try:
            js = nc.jetstream()
            small = NatsSettings(events_max_bytes=256 * 2**20, dead_letters_max_bytes=64 * 2**20)
            await ensure_streams(js, small)
            await ensure_streams(js)  # 5 GiB + 1 GiB: more than the 1GB store can reserve
            assert (await js.stream_info(EVENTS_STREAM)).config.max_bytes == small.events_max_bytes
            assert (await js.stream_info(DLQ_STREAM)).config.max_bytes == small.dead_letters_max_bytes
        finally:
            await nc.close()

    try:
        asyncio.run(start_twice())
    finally:
        server.terminate()
        server.wait(timeout=10)


def jetstream_server(folder: Path, limits: str = "") -> tuple[int, subprocess.Popen[bytes]]:
    """A nats-server of its own with JetStream in ``folder`` (``limits``: more of its jetstream block)."""

    from seal.stack import server_binary

    port = StackPorts.free().nats
    config = folder / "nats.conf"
    config.write_text(f'jetstream {{ store_dir: "{folder}/js", {limits} }}\n')
    server = subprocess.Popen([server_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return port, server


async def connected(port: int) -> nats.NATS:
    """A connection to the server on ``port`` once it listens."""
    for _ in range(100):
        try:
            return await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, max_reconnect_attempts=0)
        except Exception:  # noqa: BLE001 - not listening yet
            await asyncio.sleep(0.1)
    raise AssertionError(f"no nats-server on port {port}")


def test_a_child_of_the_cli_dies_with_it_when_the_cli_is_killed_outright(tmp_path: Path) -> None:
    """Killed outright (the OOM killer, SIGKILL), the CLI can stop nothing: its servers and services
    kept the ports and the model's memory, and the next `seal up` found its ports taken."""
    import os
    import signal
    import sys
    import time

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    script = (
        "import subprocess, sys, time\n"
        "from seal.stack import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True, preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived the process that started it")
