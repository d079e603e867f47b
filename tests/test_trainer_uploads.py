"""The trainer's one upload per adapter id (services/trainer/uploads.py), through its handlers."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from test_trainer_handlers import make_ports, self_edit_event

from services.trainer import handlers
from services.trainer.handlers import TrainerPorts


@pytest.fixture
def ports(tiny_model, tmp_path: Path) -> TrainerPorts:
    return make_ports(tiny_model, tmp_path)


async def test_an_adapter_stored_by_another_trainer_meanwhile_is_kept_not_overwritten(ports) -> None:
    # two trainers on one message (a redelivery after missed beats): the second to finish keeps the
    # first's upload, whose manifest the registry may already hold
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    stored = dict(ports.store.objects)
    ports.store.objects.clear()  # as the second trainer saw it when it started
    train = ports.trainer.train

    def train_while_the_other_uploads(job):  # noqa: ANN001, ANN202
        done = train(job)
        ports.store.objects.update(stored)
        return done

    ports.trainer.train = train_while_the_other_uploads
    ports.owner = "the-second-trainer"
    [second] = await handlers.train_self_edit(event, ports)
    assert second.adapter == first.adapter  # the same manifest digest: nothing was overwritten
    assert ports.store.puts == 1 and ports.store.objects == stored


async def test_a_trainer_that_loses_the_upload_claim_waits_for_the_others_upload_and_announces_it(ports) -> None:
    """Both trained and neither saw the other's upload before its own: the one without the claim
    uploads nothing (two uploads would leave a manifest other than the one announced) and
    announces the upload of the one with the claim, once it is there."""
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    stored = dict(ports.store.objects)
    ports.store.objects.clear()  # the first trainer holds the claim and has not uploaded yet
    ports.owner = "the-second-trainer"

    async def the_first_uploads_later() -> None:
        await asyncio.sleep(1.5)
        ports.store.objects.update(stored)

    later = asyncio.create_task(the_first_uploads_later())
    [second] = await handlers.train_self_edit(event, ports)
    await later
    assert ports.trainer.jobs == 2 and ports.store.puts == 1
    assert second.adapter == first.adapter and ports.store.objects == stored
    assert not (ports.trainer.outputs / first.adapter_id).exists()  # its own training is not left on disk


async def test_a_claim_whose_trainer_died_is_taken_over_and_one_never_released_ends_in_a_retry(ports) -> None:
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    [key] = [k for k in ports.ledger.values if k.startswith("trainer.upload.")]
    ports.store.objects.clear()
    ports.owner = "the-second-trainer"
    ports.upload_wait_s = 0.5
    with pytest.raises(RuntimeError, match="being stored by another trainer and was not stored after 0s"):
        await handlers.train_self_edit(event, ports)
    assert ports.store.puts == 1 and not ports.store.objects
    # the first trainer's claim is older than the claim's limit: its trainer is taken for gone
    ports.ledger.values[key] = json.dumps({"owner": "the-first-trainer", "at": time.time() - 700}).encode()
    [third] = await handlers.train_self_edit(event, ports)
    assert ports.store.puts == 2 and third.adapter == ports.store.stored(first.adapter.uri)[0]


async def test_a_failed_upload_gives_its_claim_up(ports) -> None:
    """Else the redelivery, on another trainer, would wait out the claim (10 minutes) while its
    deliveries run out."""
    event = self_edit_event()
    put = ports.store.put_adapter

    def s3_down(*args: object) -> None:
        raise ConnectionError("S3 is down")

    ports.store.put_adapter = s3_down
    with pytest.raises(ConnectionError):
        await handlers.train_self_edit(event, ports)
    assert not [k for k in ports.ledger.values if k.startswith("trainer.upload.")]
    ports.store.put_adapter = put
    ports.owner = "another-trainer"
    [done] = await handlers.train_self_edit(event, ports)
    assert ports.store.puts == 1 and done.adapter == ports.store.stored(done.adapter.uri)[0]


async def test_a_stale_claim_is_not_taken_over_when_the_adapter_is_stored(ports) -> None:
    """The first trainer stored and announced the adapter and keeps its claim; a second one that
    finishes training past the claim's limit must announce that upload, not store over it."""
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    [key] = [k for k in ports.ledger.values if k.startswith("trainer.upload.")]
    stored = dict(ports.store.objects)
    ports.store.objects.clear()  # as the second trainer saw it when it started
    train = ports.trainer.train

    def train_past_the_claims_limit(job):  # noqa: ANN001, ANN202
        done = train(job)
        ports.store.objects.update(stored)
        ports.ledger.values[key] = json.dumps({"owner": "first", "at": time.time() - 700}).encode()
        return done

    ports.trainer.train = train_past_the_claims_limit
    ports.owner = "the-second-trainer"
    [second] = await handlers.train_self_edit(event, ports)
    assert second.adapter == first.adapter and ports.store.puts == 1 and ports.store.objects == stored


async def test_a_waiting_trainer_uploads_its_own_training_when_the_holder_gives_up(ports) -> None:
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    [key] = [k for k in ports.ledger.values if k.startswith("trainer.upload.")]
    ports.store.objects.clear()
    ports.owner = "the-second-trainer"

    async def the_holders_upload_fails() -> None:
        await asyncio.sleep(1.5)
        ports.ledger.values.pop(key)

    gives_up = asyncio.create_task(the_holders_upload_fails())
    [second] = await handlers.train_self_edit(event, ports)
    await gives_up
    assert ports.trainer.jobs == 2 and ports.store.puts == 2  # its own training, not a third
    assert second.adapter == ports.store.stored(first.adapter.uri)[0]


async def test_a_stopping_trainer_hands_the_message_back_instead_of_waiting(ports) -> None:
    from shared.shutdown import Interrupted

    event = self_edit_event()
    await handlers.train_self_edit(event, ports)
    ports.store.objects.clear()  # the claim's holder has not uploaded yet
    ports.owner = "the-second-trainer"
    train = ports.trainer.train

    def train_then_stop(job):  # noqa: ANN001, ANN202
        done = train(job)
        ports.trainer.stopping.set()
        return done

    ports.trainer.train = train_then_stop
    with pytest.raises(Interrupted, match="stopping"):
        await handlers.train_self_edit(event, ports)
