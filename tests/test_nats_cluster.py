"""Streams and KV buckets on real nats-servers: on a three-node JetStream cluster, the replica
count the settings ask for (SEAL_NATS__STREAM_REPLICAS, 3 in the prod overlay) is what they get,
also for streams and buckets created earlier with one; on one server, the keys' lifetime."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from seal.stack import free_port, server_binary
from shared.broker import ensure_streams
from shared.settings import NatsSettings
from shared.subjects import KV_BUCKETS, KV_REGISTRY, STREAMS

pytestmark = pytest.mark.servers


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[str]]:
    """Three nats-server processes routed into one JetStream cluster; their client URLs."""
    clients = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    procs = []
    for i in range(3):
        others = ",".join(f"nats://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
        cmd = [
            server_binary("nats-server"), "--jetstream", "--store_dir", str(tmp_path / f"n{i}"),
            "--addr", "127.0.0.1", "--port", str(clients[i]), "--server_name", f"n{i}",
            "--cluster_name", "seal", "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", others,
        ]
        log = (tmp_path / f"n{i}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield [f"nats://127.0.0.1:{port}" for port in clients]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def test_ensure_streams_raises_existing_streams_and_buckets_to_the_replicas_asked(cluster: list[str]) -> None:
    nc = await nats.connect(cluster, connect_timeout=5)
    js = nc.jetstream()
    try:
        for _ in range(100):  # until the cluster has elected its meta leader
            try:
                await js.account_info()
                break
            except Exception:  # noqa: BLE001 - "JetStream not ready" while the servers meet
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the three servers formed no JetStream cluster within 20 s (logs in tmp_path)")
        names = [s.name for s in STREAMS] + [f"KV_{b}" for b in KV_BUCKETS]

        async def replicas() -> dict[str, int]:
            return {name: (await js.stream_info(name)).config.num_replicas for name in names}

        await ensure_streams(js, NatsSettings(stream_replicas=1))  # a single server's settings, as a cluster first gets them
        assert set((await replicas()).values()) == {1}
        kv = await js.key_value(KV_REGISTRY)
        await kv.put("scope.s", b"v1")

        await ensure_streams(js, NatsSettings(stream_replicas=3))
        assert set((await replicas()).values()) == {3}
        assert (await kv.get("scope.s")).value == b"v1"  # what the bucket held is still there
        await ensure_streams(js, NatsSettings(stream_replicas=3))  # and again on the next start: nothing to change
        assert set((await replicas()).values()) == {3}
    finally:
        await nc.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """One nats-server with JetStream; its client URL."""
    port = free_port()
    cmd = [server_binary("nats-server"), "--jetstream", "--store_dir", str(tmp_path / "js"), "--addr", "127.0.0.1", "--port", str(port)]
    with (tmp_path / "nats.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_processed_bucket_forgets_keys_after_the_events_stream_does_and_no_other_bucket_does(server: str) -> None:
    from shared.subjects import EVENTS_STREAM, KV_IDEMPOTENCY, KV_MAX_AGE

    for _ in range(100):
        try:
            nc = await nats.connect(server, connect_timeout=1, allow_reconnect=False)
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            await asyncio.sleep(0.1)
    else:
        pytest.fail("nats-server did not start within 10 s")
    js = nc.jetstream()
    try:
        # A bucket as an earlier version made it (keys kept for ever), with a key in it.
        old = await js.create_key_value(bucket=KV_IDEMPOTENCY, history=16)
        await old.put("generator.acme.fb-1", b"done")

        await ensure_streams(js, NatsSettings(stream_replicas=1))

        ages = {b: (await js.stream_info(f"KV_{b}")).config.max_age for b in KV_BUCKETS}
        events = (await js.stream_info(EVENTS_STREAM)).config.max_age
        assert ages.pop(KV_IDEMPOTENCY) == KV_MAX_AGE[KV_IDEMPOTENCY].total_seconds() > events
        assert set(ages.values()) == {0}  # the registry's records and the scope settings never expire
        assert (await (await js.key_value(KV_IDEMPOTENCY)).get("generator.acme.fb-1")).value == b"done"
        await ensure_streams(js, NatsSettings(stream_replicas=1))  # the next start changes nothing
        assert (await js.stream_info(f"KV_{KV_IDEMPOTENCY}")).config.max_age == KV_MAX_AGE[KV_IDEMPOTENCY].total_seconds()
        await js.delete_key_value(KV_IDEMPOTENCY)  # and a bucket made new gets it too
        await ensure_streams(js, NatsSettings(stream_replicas=1))
        assert (await js.stream_info(f"KV_{KV_IDEMPOTENCY}")).config.max_age == KV_MAX_AGE[KV_IDEMPOTENCY].total_seconds()
    finally:
        await nc.close()
