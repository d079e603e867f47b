"""Trainer against the real servers: the real object store, and trainers killed mid-training."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import nats
import pytest
import torch
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from peft import PeftModel
from test_trainer_handlers import DIRECTIVES, SEQUENCES, FakeLedger, FakeRegistry
from transformers import AutoModelForCausalLM

from seal.stack import free_port
from services.trainer import handlers
from services.trainer.handlers import TrainerPorts
from services.trainer.lora_training import LoraTrainer
from services.trainer.ports import KvParentLedger, ParentCache, StoredAdapters
from services.trainer.settings import TrainerConfig
from shared import events as ev
from shared.connections import connect_options
from shared.store import AdapterStore
from shared.subjects import ADAPTER_TRAINED, EVENTS_STREAM, SELFEDIT_GENERATED

pytestmark = pytest.mark.servers

MODEL_CACHE = Path(os.environ.get("SEAL_TEST_MODEL_CACHE", "~/.cache/seal/models")).expanduser()
ROOT = Path(__file__).resolve().parents[1]


def adapter_ids(store: AdapterStore, scope: str) -> set[str]:
    objects = store.client.list_objects(store.bucket, prefix=f"adapters/{scope}/", recursive=True)
    return {obj.object_name.split("/")[2] for obj in objects}


async def test_upload_claims_in_the_real_bucket(provisioned_stack) -> None:
    """One trainer holds an adapter's upload; another is kept out until the claim is stale."""
    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        ledger = KvParentLedger(nc.jetstream())
        key = f"trainer.upload.claim-{time.time_ns()}"
        assert await ledger.claim(key, "trainer-a", stale_s=600)
        assert await ledger.claim(key, "trainer-a", stale_s=600)  # its own again: a redelivery to it
        assert not await ledger.claim(key, "trainer-b", stale_s=600)
        await asyncio.sleep(1.1)
        assert await ledger.claim(key, "trainer-b", stale_s=1)  # trainer-a's claim is stale now
        assert not await ledger.claim(key, "trainer-a", stale_s=600)
        await ledger.release(key, "trainer-a")  # not its claim: nothing happens
        assert not await ledger.claim(key, "trainer-a", stale_s=600)
        await ledger.release(key, "trainer-b")
        assert await ledger.claim(key, "trainer-a", stale_s=600)
    finally:
        await nc.close()


async def test_stored_adapter_loads_with_peft_and_matches_the_trained_model(
    adapter_store: AdapterStore, tiny_model, tmp_path: Path
) -> None:
    storage = StoredAdapters(adapter_store)
    trainer = LoraTrainer(tiny_model, tmp_path / "work")
    ids = torch.tensor([tiny_model.tokenizer(SEQUENCES[0])["input_ids"]])
    recorded: dict[str, torch.Tensor] = {}
    save = trainer.host.save

    def save_and_record(name: str, directory: Path) -> Path:
        with torch.no_grad():
            recorded["logits"] = trainer.host.model(input_ids=ids).logits
        return save(name, directory)

    trainer.host.save = save_and_record  # type: ignore[method-assign]
    ports = TrainerPorts(trainer, storage, FakeRegistry(), FakeLedger(), ParentCache(storage, tmp_path / "parents"))
    edit = ev.SelfEdit(self_edit_id=ev.new_id(), format="implications", completion="x", sequences=SEQUENCES, directives=DIRECTIVES)
    event = ev.SelfEditGenerated(feedback_id=ev.new_id(), scope=f"s3-{edit.self_edit_id[:8]}", self_edit=edit)
    [out] = await handlers.train_self_edit(event, ports)
    assert isinstance(out, ev.AdapterTrained)

    manifest = adapter_store.get_adapter(out.adapter, tmp_path / "downloaded")  # checks every sha256
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model.path), str(tmp_path / "downloaded"))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, recorded["logits"], atol=1e-5)
    # A second delivery finds it stored: same event, nothing retrained or rewritten.
    [again] = await handlers.train_self_edit(event, ports)
    assert again.event_id == out.event_id and again.adapter == out.adapter


class Trainer:
    """``python -m services.trainer`` as a child process, its log lines in a shared queue."""

    def __init__(self, name: str, env: dict[str, str], lines: asyncio.Queue[tuple[str, str]]):
        self.name, self.env, self.lines = name, env, lines
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    async def start(self) -> "Trainer":
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.trainer", cwd=ROOT, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            await self.lines.put((self.name, line))

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
async def test_a_trainer_killed_or_stopped_mid_training_still_yields_exactly_one_adapter(
    provisioned_stack, adapter_store: AdapterStore, tmp_path: Path, sig: signal.Signals
) -> None:
    """Killed, the trainer's message comes back after ack_wait; stopped (SIGTERM, as Kubernetes stops a
    pod), it ends its training at the next step and hands the message back at once."""
    group = f"kill{ev.new_id()[:8]}"
    # Stopped: an ack_wait long enough that only the handing back explains a quick redelivery.
    ack_wait = 3.0 if sig == signal.SIGKILL else 30.0
    # Killed: past 2 x ack_wait of paced training (0.75 s an epoch) before the kill.
    past = "epoch 8/12" if sig == signal.SIGKILL else "epoch 4/12"
    config = TrainerConfig(ack_wait_s=ack_wait, consumer_group=group)
    scope = f"kill-{group}"
    nc = await nats.connect(provisioned_stack.nats_url, **connect_options(provisioned_stack.nats_settings()))
    js = nc.jetstream()
    # The trainers' consumers, created here so they see only what this test publishes.
    for spec in (config.self_edits, config.rebases, config.policy):
        await js.add_consumer(EVENTS_STREAM, ConsumerConfig(
            durable_name=spec.durable, filter_subject=spec.subject, deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=5,
        ))
    trained: asyncio.Queue[ev.AdapterTrained] = asyncio.Queue()

    async def on_trained(msg: nats.aio.msg.Msg) -> None:
        event = ev.AdapterTrained.from_json(msg.data)
        if event.scope == scope:
            await trained.put(event)

    await nc.subscribe(ADAPTER_TRAINED, cb=on_trained)
    lines: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    trainers = {}
    for name in ("a", "b"):
        env = {
            **os.environ, **provisioned_stack.env(),
            "SEAL_MODEL__NAME": "tiny", "SEAL_MODEL__CACHE_DIR": str(MODEL_CACHE), "SEAL_MODEL__DEVICE": "cpu",
            "SEAL_HTTP_HOST": "127.0.0.1", "SEAL_HTTP_PORT": str(free_port()), "SEAL_LOG_LEVEL": "INFO",
            "SEAL_TRAINER__ACK_WAIT_S": str(ack_wait), "SEAL_TRAINER__CONSUMER_GROUP": group,
            "SEAL_TRAINER__STEP_PAUSE_S": "0.25", "SEAL_TRAINER__WORK_DIR": str(tmp_path / name),
        }
        trainers[name] = await Trainer(name, env, lines).start()
    # 3 sequences, batch 1, 12 epochs: 36 paced steps, about 9 s of training, three times ack_wait.
    slow = DIRECTIVES.model_copy(update={"epochs": 12, "batch_size": 1})
    edit = ev.SelfEdit(self_edit_id=ev.new_id(), format="implications", completion="x", sequences=SEQUENCES, directives=slow)
    event = ev.SelfEditGenerated(feedback_id=ev.new_id(), scope=scope, self_edit=edit)
    try:
        await js.publish(SELFEDIT_GENERATED, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})
        started: list[str] = []
        victim = None

        async def watch() -> str:
            while True:
                name, line = await lines.get()
                if f"training for selfedit.generated {event.event_id}" in line:
                    started.append(name)
                if started and name == started[0] and past in line:
                    return name  # trained past 2 x ack_wait, its message kept alive so far

        victim = await asyncio.wait_for(watch(), 180)
        # Kept alive by in-progress acks: nobody else got the message while the victim trained.
        assert started == [victim]
        survivor = "b" if victim == "a" else "a"
        signalled = time.monotonic()
        await trainers[victim].stop(sig)
        if sig == signal.SIGTERM:
            # out well inside its 30 s graceful timeout (it had 24 paced steps left), and its
            # message with the survivor well before ack_wait

            async def redelivered() -> None:
                while f"{event.event_id} (scope {scope}, delivery 2)" not in (await lines.get())[1]:
                    pass

            assert time.monotonic() - signalled < 15
            # a clean shutdown: uvicorn raises the signal again once it is done, hence -SIGTERM
            assert trainers[victim].proc.returncode == -signal.SIGTERM
            log = "\n".join(trainers[victim].log)
            assert "handed back for redelivery: the trainer is shutting down (stopped before step" in log
            assert "shut down gracefully" in log
            await asyncio.wait_for(redelivered(), 15)
        out = await asyncio.wait_for(trained.get(), 120)
        for trainer in trainers.values():
            await trainer.stop()
    finally:
        for trainer in trainers.values():
            await trainer.stop(signal.SIGKILL)
    try:
        assert out.self_edit_id == edit.self_edit_id
        assert any(f"{event.event_id} (scope {scope}, delivery 2)" in line for line in trainers[survivor].log)
        # Exactly one adapter in the bucket, exactly one adapter.trained in the stream.
        assert adapter_ids(adapter_store, scope) == {out.adapter_id}
        info = await js.consumer_info(EVENTS_STREAM, config.self_edits.durable)
        assert info.delivered.consumer_seq == 2  # the victim's delivery and the survivor's, no other
        assert info.num_ack_pending == 0 and info.num_pending == 0
        reader = await js.pull_subscribe(ADAPTER_TRAINED, stream=EVENTS_STREAM, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30))
        published = []
        while (await reader.consumer_info()).num_pending:
            for msg in await reader.fetch(100, timeout=5):
                body = json.loads(msg.data)
                if body.get("scope") == scope:
                    published.append(body["event_id"])
        assert published == [out.event_id]
    finally:
        for spec in (config.self_edits, config.rebases, config.policy):
            await js.delete_consumer(EVENTS_STREAM, spec.durable)
        await nc.close()
