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
