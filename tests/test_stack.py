"""The embedded stack: starts, answers, stops, and finds its data again."""

from __future__ import annotations

import asyncio
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

    from seal.cli import SERVICE_PORT_BASE, SERVICES, free_service_port_base
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


def test_sigterm_runs_the_cleanup_that_stops_the_services(tmp_path: Path) -> None:
    import subprocess
    import sys

    marker = tmp_path / "stopped"
    script = (
        "import os, signal, time\n"
        "from seal.cli import stop_on_sigterm\n"
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
