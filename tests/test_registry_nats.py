"""The registry in-process against a real nats-server and S3 server.

Crafted pipeline events go in over JetStream; the test waits on the events
the registry publishes (subscriptions, no sleeping), and checks KV, the HTTP
API, NATS request-reply and `ask` with a real (tiny) adapter.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import nats
import pytest
from test_registry_support import evaluated, feedback, self_edit

from services.registry.app import create_app
from services.registry.kv import NatsState
from services.registry.settings import RegistryConfig, RegistrySettings
from shared import events as ev
from shared.dead_letters import REASON_HEADER
from shared.registry_view import read_accepted_probes, read_active
from shared.store import AdapterManifest
from shared.subjects import ADAPTER_EVALUATED, AUDIT_PREFIX, DLQ_PREFIX, EVENTS_PREFIX, REGISTRY_RPC, subject_for

pytestmark = pytest.mark.servers


class Events:
    """Everything published under seal.events.> and seal.audit.>, for waiting on."""

    def __init__(self, nc: nats.NATS):
        self.nc = nc
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.seen: list[ev.Event] = []

    async def start(self) -> "Events":
        async def on(msg) -> None:
            try:
                await self.queue.put(ev.parse_event(msg.data))
            except ev.EventValidationError:
                pass

        await self.nc.subscribe(f"{EVENTS_PREFIX}.>", cb=on)
        await self.nc.subscribe(f"{AUDIT_PREFIX}.>", cb=on)
        return self

    async def wait_for(self, match: Callable[[ev.Event], bool], timeout: float = 30) -> ev.Event:
        for event in self.seen:
            if match(event):
                self.seen.remove(event)
                return event
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await asyncio.wait_for(self.queue.get(), max(0.01, deadline - loop.time()))
            if match(event):
                return event
            self.seen.append(event)


def of(cls: type[ev.Event], scope: str, **fields: object) -> Callable[[ev.Event], bool]:
    return lambda e: isinstance(e, cls) and e.scope == scope and all(getattr(e, k) == v for k, v in fields.items())


@pytest.fixture(scope="module")
def peft_dir(tiny_model, tmp_path_factory) -> Path:
    """A real LoRA adapter for the tiny model (random, but loadable)."""
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(copy.deepcopy(tiny_model.model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(path)
    return path


@pytest.fixture
async def running(service_settings, adapter_store, tmp_path):
    settings = RegistrySettings(
        nats=service_settings.nats,
        store=service_settings.store,
        model=service_settings.model,
        registry=RegistryConfig(sweep_interval_s=0.5, adapter_cache_dir=tmp_path / "adapters"),
        _secrets_dir=str(tmp_path / "none"),
    )
    app = create_app(settings)
    nc = await nats.connect(settings.nats.url)
    events = await Events(nc).start()
    await app.state.runtime.start()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry")
    try:
        yield app, nc, events, http
    finally:
        await http.aclose()
        stopping = asyncio.ensure_future(app.state.runtime.stop())
        done, _ = await asyncio.wait({stopping}, timeout=45)
        if not done:  # say where it is stuck rather than hang the session
            for task in asyncio.all_tasks():
                task.print_stack(limit=6)
            pytest.fail("the registry did not stop within 45s")
        await nc.close()


def stored(adapter_store, peft_dir: Path, event: ev.AdapterEvaluated, base_sha: str | None) -> ev.AdapterEvaluated:
    """Put a real adapter where the crafted evaluation says it is."""
    ref = adapter_store.put_adapter(
        peft_dir,
        AdapterManifest(
            adapter_id=event.adapter_id, scope=event.scope, base_model="tiny", base_model_sha256=base_sha,
            feedback_ids=(event.feedback_id,), self_edit_id=event.self_edit_id, trace_id=event.trace_id,
        ),
    )
    return event.model_copy(update={"adapter": ref})


async def publish(nc: nats.NATS, event: ev.Event) -> None:
    await nc.jetstream().publish(subject_for(event), event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})


async def test_concurrent_feedback_is_rebased_promoted_rolled_back_and_asked(
    running, adapter_store, peft_dir, tiny_model
) -> None:
    app, nc, events, http = running
    scope = f"reg-{ev.new_id()[:10]}"
    a, b = feedback(scope, passage="Quellmoor got its charter in 1387."), feedback(scope, passage="Its mayor is Ilse Varn.")
    sha = tiny_model.weights_sha256
    for root in (a, b):
        await publish(nc, root)
        await publish(nc, self_edit(root, 0, 1))
    # Both candidates were trained on the base model, both reported at once.
    first = [await asyncio.to_thread(stored, adapter_store, peft_dir, evaluated(r, 0, 1, reward=0.2), sha) for r in (a, b)]
    await asyncio.gather(*(publish(nc, e) for e in first))

    promoted = await events.wait_for(of(ev.AdapterPromoted, scope))
    rebase = await events.wait_for(of(ev.RebaseRequested, scope))
    assert promoted.version == 1 and rebase.parent_version == 1 and rebase.attempt == 2  # type: ignore[attr-defined]
    assert {promoted.feedback_id, rebase.feedback_id} == {a.feedback_id, b.feedback_id}
    other = a if rebase.feedback_id == a.feedback_id else b
    assert rebase.self_edit.self_edit_id == f"{other.feedback_id}-se0"  # type: ignore[attr-defined]

    # Playing trainer and evaluator: the rebased candidate, trained on v1.
    again = await asyncio.to_thread(
        stored, adapter_store, peft_dir, evaluated(other, 0, 1, reward=0.3, parent_version=1, attempt=2), sha
    )
    await publish(nc, again)
    second = await events.wait_for(of(ev.AdapterPromoted, scope, version=2))
    assert (second.feedback_id, second.previous_version) == (other.feedback_id, 1)  # type: ignore[attr-defined]

    js = nc.jetstream()
    active = await read_active(js, scope)
    assert active is not None and active.version == 2 and active.adapter_id == again.adapter_id
    probes = await read_accepted_probes(js, scope)
    assert {fid for fid, _ in probes.probes} == {a.feedback_id, b.feedback_id}

    versions = (await http.get(f"/v1/scopes/{scope}/versions")).json()
    assert [(v["version"], v["aliases"]) for v in versions] == [(1, ["previous"]), (2, ["active"])]
    assert {v["feedback_id"] for v in versions} == {a.feedback_id, b.feedback_id}
    lineage = (await http.get(f"/v1/scopes/{scope}/versions/2/lineage")).json()
    assert lineage["feedback"]["feedback_id"] == other.feedback_id and lineage["feedback"]["trace_id"]
    assert lineage["training"]["manifest"]["base_model"] == "tiny" and lineage["self_edit"]["format"] == "implications"
    assert lineage["version"]["registry_trace_id"] and lineage["evaluation"]["attempt"] == 2
    fate = (await http.get(f"/v1/feedback/{other.feedback_id}")).json()
    assert fate["state"] == "promoted" and fate["version"] == 2

    # Roll back over HTTP: audited, and active.<scope> moves.
    reply = await http.post(
        f"/v1/scopes/{scope}/rollback", json={"to_version": 1, "operator": "sre-alice", "reason": "v2 regressed"}
    )
    assert reply.status_code == 200 and reply.json()["active_version"] == 1
    rolled = await events.wait_for(of(ev.AdapterRolledBack, scope))
    audit = await events.wait_for(of(ev.OperatorAction, scope, action="rollback"))
    assert (rolled.from_version, rolled.to_version) == (2, 1)  # type: ignore[attr-defined]
    assert (audit.operator, audit.reason) == ("sre-alice", "v2 regressed")  # type: ignore[attr-defined]
    assert (await read_active(js, scope)).version == 1  # type: ignore[union-attr]

    # Pin over NATS request-reply, as another service would.
    msg = await nc.request(f"{REGISTRY_RPC}.pin", json.dumps({"scope": scope, "operator": "sre-bob", "reason": "freeze"}).encode(), timeout=10)
    assert json.loads(msg.data)["result"]["pinned"] is True
    assert (await read_active(js, scope)).pinned  # type: ignore[union-attr]

    # Ask the scope's active model: the base model plus v1's adapter.
    answer = await http.post(f"/v1/scopes/{scope}/ask", json={"question": "When did Quellmoor get its charter?", "max_new_tokens": 8})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["version"], body["adapter_id"], body["base_model"]) == (1, promoted.adapter_id, "tiny")  # type: ignore[attr-defined]
    assert isinstance(body["answer"], str)


async def test_timeout_sweep_and_dead_letters_over_a_real_server(running, adapter_store, peft_dir) -> None:
    app, nc, events, http = running
    scope = f"reg-{ev.new_id()[:10]}"
    policy = await http.patch(f"/v1/scopes/{scope}/policy", json={"candidates": 2, "decision_timeout_s": 5.0},
                            params={"operator": "sre", "reason": "a short timeout"})
    assert policy.status_code == 200
    root = feedback(scope)
    dead = await nc.subscribe(f"{DLQ_PREFIX}.registry.>")
    # Stored first: the decision's clock starts when the registry hears of the feedback, and an
    # upload slower than the timeout would leave no candidate with an outcome in time.
    only = await asyncio.to_thread(stored, adapter_store, peft_dir, evaluated(root, 0, 2, reward=0.2), None)
    await publish(nc, root)
    await publish(nc, only)  # candidate 1 never reports: the sweep decides after the timeout
    promoted = await events.wait_for(of(ev.AdapterPromoted, scope), timeout=30)
    timed_out = await events.wait_for(of(ev.AdapterRejected, scope), timeout=10)
    assert promoted.feedback_id == root.feedback_id
    assert "decision timeout" in timed_out.reasons[0]  # type: ignore[attr-defined]

    await nc.jetstream().publish(ADAPTER_EVALUATED, b'{"type": "adapter.evaluated", "scope": "../etc"}')
    letter = await dead.next_msg(timeout=20)
    assert "scope" in letter.headers[REASON_HEADER]


async def test_compare_and_set_over_real_kv_loses_no_update(running) -> None:
    _, nc, _, _ = running
    # Four registries writing one hot key: without a pause between retries, one could lose every
    # one of its tries to the others' writes and give up (ConflictError).
    others = [await nats.connect(nc.connected_url.geturl()) for _ in range(3)]
    try:
        states = [NatsState(nc.jetstream()), *(NatsState(o.jetstream()) for o in others)]
        key = f"test.counter.{ev.new_id()[:8]}"
        from shared.registry_view import AcceptedProbes
        from shared.subjects import KV_REGISTRY

        def add_one(current: AcceptedProbes | None) -> AcceptedProbes:
            current = current or AcceptedProbes(scope="counter")
            probe = ev.Probe(question=f"q{len(current.probes)}", answer="a")
            return current.model_copy(update={"probes": (*current.probes, ("f", probe))})

        async def writer(state: NatsState) -> None:
            for _ in range(10):
                await state.compare_and_set(KV_REGISTRY, key, AcceptedProbes, add_one)

        await asyncio.gather(*(writer(s) for s in states))
        final = await states[0].read(KV_REGISTRY, key, AcceptedProbes)
        assert final is not None and len(final.probes) == 40
        assert [p.question for _, p in final.probes] == [f"q{i}" for i in range(40)]
        listed = await states[1].entries(KV_REGISTRY, "test.counter.*", AcceptedProbes)
        assert key in listed
        other_key = f"{key}x"
        await states[0].put(KV_REGISTRY, other_key, final)
        assert {key, other_key} <= set(await states[1].keys(KV_REGISTRY, "test.counter.*"))
        assert await states[1].keys(KV_REGISTRY, "test.elsewhere.*") == []
        await states[0].delete(KV_REGISTRY, key)
        await states[0].delete(KV_REGISTRY, other_key)
        assert key not in await states[1].keys(KV_REGISTRY, "test.counter.*")  # a deleted key is not live
    finally:
        for o in others:
            await o.close()


async def test_a_value_that_no_longer_parses_is_written_over_only_when_asked(running) -> None:
    _, nc, _, _ = running
    from shared.registry_view import ScopePolicy, UnreadableRecord
    from shared.subjects import KV_SCOPE_SETTINGS

    state, key = NatsState(nc.jetstream()), f"broken-{ev.new_id()[:8]}"
    await (await nc.jetstream().key_value(KV_SCOPE_SETTINGS)).put(key, b"not json at all")
    seen: list[ScopePolicy | None] = []

    def repair(current: ScopePolicy | None) -> ScopePolicy:
        seen.append(current)
        return ScopePolicy(candidates=2)

    with pytest.raises(UnreadableRecord, match=key):
        await state.compare_and_set(KV_SCOPE_SETTINGS, key, ScopePolicy, repair)
    assert seen == []
    assert await state.compare_and_set(KV_SCOPE_SETTINGS, key, ScopePolicy, repair, unreadable_as_absent=True) == ScopePolicy(candidates=2)
    assert seen == [None] and await state.read(KV_SCOPE_SETTINGS, key, ScopePolicy) == ScopePolicy(candidates=2)
    await state.delete(KV_SCOPE_SETTINGS, key)


async def test_a_dead_letter_is_listed_with_its_reason_and_replayed_once(running) -> None:
    """An SRE lists what was given up on and why, and replays an event once its cause is fixed: it
    goes to its subject again (the registry here takes it), the audit stream says who and why, and
    the dead letter is gone, so a second replay finds nothing."""
    from shared.dead_letters import SERVICE_HEADER
    from shared.subjects import DLQ_STREAM

    app, nc, events, http = running
    js = nc.jetstream()
    scope = f"dlq-{ev.new_id()[:10]}"
    root = feedback(scope)
    # a reason quoting a product's text: nats-py hands non-ASCII header values back as email Header objects
    headers = {REASON_HEADER: "failed 5 times; last error: S3Error: the S3 server is restarting (résumé — 履歴書)", SERVICE_HEADER: "generator",
               "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    ack = await js.publish(f"{DLQ_PREFIX}.generator.{subject_for(root)}", root.model_dump_json().encode(),
                           headers=headers, stream=DLQ_STREAM)
    bad = await js.publish(f"{DLQ_PREFIX}.generator.{subject_for(root)}", b'{"type": "feedback.submitted"}',
                           headers={REASON_HEADER: "invalid payload", SERVICE_HEADER: "generator"}, stream=DLQ_STREAM)

    listed = (await http.get("/v1/dead-letters", params={"service": "generator", "limit": 200})).json()
    [entry] = [e for e in listed if e["event_id"] == root.event_id]
    assert entry["sequence"] == ack.seq and entry["subject"] == subject_for(root)
    assert entry["reason"] == headers[REASON_HEADER] and entry["feedback_id"] == root.feedback_id and entry["scope"] == scope
    assert [e["sequence"] for e in listed][:2] == [bad.seq, ack.seq]  # newest first
    assert all(e["service"] == "generator" for e in listed)
    assert (await http.get("/v1/dead-letters", params={"service": "Bad Name!"})).status_code == 422

    refused = await http.post(f"/v1/dead-letters/{bad.seq}/replay", json={"operator": "sre-ana", "reason": "fixed"})
    assert refused.status_code == 409 and "no valid event" in refused.json()["detail"]

    replayed = await http.post(f"/v1/dead-letters/{ack.seq}/replay", json={"operator": "sre-ana", "reason": "S3 is back"})
    assert replayed.status_code == 200 and replayed.json()["replayed_to"] == subject_for(root)
    audit = await events.wait_for(of(ev.OperatorAction, scope, action="replay"), timeout=10)
    assert audit.operator == "sre-ana" and audit.feedback_id == root.feedback_id and audit.causation_id == root.event_id
    assert audit.reason == f"S3 is back (dead letter {ack.seq} of the generator: feedback.submitted {root.event_id} to {subject_for(root)})"
    for _ in range(100):  # the registry takes the replayed feedback like any other
        if (await http.get(f"/v1/feedback/{root.feedback_id}")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the replayed feedback never reached the registry")
    again = await http.post(f"/v1/dead-letters/{ack.seq}/replay", json={"operator": "sre-ana", "reason": "twice"})
    assert again.status_code == 404 and "replayed already" in again.json()["detail"]
    copy_ = await js.get_last_msg("SEAL_EVENTS", subject_for(root))
    assert copy_.headers["Seal-Replayed-From"] == f"{DLQ_STREAM}/{ack.seq}" and copy_.headers["traceparent"] == headers["traceparent"]


async def test_two_replicas_replaying_one_dead_letter_at_once_both_succeed_and_it_goes_out_once(provisioned_stack) -> None:
    from services.registry.redrive import DeadLetters
    from shared.dead_letters import SERVICE_HEADER
    from shared.subjects import DLQ_STREAM

    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        js = nc.jetstream()
        root = feedback(f"dlq2-{ev.new_id()[:10]}")
        ack = await js.publish(f"{DLQ_PREFIX}.generator.{subject_for(root)}", root.model_dump_json().encode(),
                               headers={REASON_HEADER: "failed", SERVICE_HEADER: "generator"}, stream=DLQ_STREAM)
        audits: list[ev.Event] = []

        async def audit(event: ev.Event) -> None:
            audits.append(event)

        first, second = DeadLetters(lambda: js, audit), DeadLetters(lambda: js, audit)
        done = await asyncio.gather(first.replay(ack.seq, "sre-a", "fixed", request_id="req-a"),
                                    second.replay(ack.seq, "sre-b", "fixed", request_id="req-b"), return_exceptions=True)
        assert all(isinstance(d, dict) or type(d).__name__ == "NotFound" for d in done), done
        assert any(isinstance(d, dict) for d in done)
        # each operator whose replay went through is audited under its own id (the event went out once, below)
        assert len(audits) == sum(isinstance(d, dict) for d in done) == len({a.event_id for a in audits})
        copies = await js.pull_subscribe(subject_for(root), durable=None, stream="SEAL_EVENTS",
                                         config=nats.js.api.ConsumerConfig(deliver_policy=nats.js.api.DeliverPolicy.LAST_PER_SUBJECT))
        [last] = await copies.fetch(1, timeout=5)
        assert last.headers["Seal-Replayed-From"] == f"{DLQ_STREAM}/{ack.seq}"
    finally:
        await nc.close()


async def test_one_services_dead_letters_are_listed_under_a_flood_of_anothers(provisioned_stack, monkeypatch) -> None:
    """A flood of generator dead letters (malformed feedback) after a few of the trainer's: listing the
    trainer's still finds them, newest first, however far back they are."""
    from services.registry import redrive
    from shared.dead_letters import SERVICE_HEADER
    from shared.subjects import DLQ_STREAM

    monkeypatch.setattr(redrive, "SERVICE_WINDOW", 7)  # many steps back over a small flood
    monkeypatch.setattr(redrive, "SCAN_MAX", 20)
    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        js = nc.jetstream()
        service = f"t{ev.new_id()[:8]}"
        ours = []
        for i in range(3):
            ack = await js.publish(f"{DLQ_PREFIX}.{service}.seal.events.selfedit.generated", f'{{"n": {i}}}'.encode(),
                                   headers={REASON_HEADER: f"S3 down {i}", SERVICE_HEADER: service}, stream=DLQ_STREAM)
            ours.append(ack.seq)
        for i in range(40):
            await js.publish(f"{DLQ_PREFIX}.flood.seal.events.feedback.submitted", b"{}",
                             headers={REASON_HEADER: "invalid", SERVICE_HEADER: "flood"}, stream=DLQ_STREAM)
        letters = redrive.DeadLetters(lambda: js, None)  # type: ignore[arg-type]
        listed = await letters.latest(service, 2)
        assert [e["sequence"] for e in listed] == ours[::-1][:2] and listed[0]["reason"] == "S3 down 2"
        assert [e["sequence"] for e in await letters.latest(service, 10)] == ours[::-1]
        assert len(await letters.latest(None, 5)) == 5  # all services: the newest, as before
    finally:
        await nc.close()
