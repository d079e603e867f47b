"""The registry's subscriptions and request-reply through FastStream's in-memory broker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from faststream.nats import JStream, TestNatsBroker
from test_registry_support import Clock, FakeManifests, evaluated, feedback, training_failed

from services.registry.app import AppPorts, create_app
from services.registry.kv import MemoryState
from services.registry.settings import RegistryConfig, RegistrySettings
from shared import events as ev
from shared.subjects import (
    ADAPTER_EVALUATED,
    ADAPTER_PROMOTED,
    ADAPTER_REJECTED,
    ADAPTER_TRAINING_FAILED,
    AUDIT_STREAM,
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_STREAM,
    FEEDBACK_SUBMITTED,
    OPERATOR_ACTION,
    REGISTRY_RPC,
)

# Published events go through JetStream; the in-memory broker routes them by stream too.
EVENTS = JStream(EVENTS_STREAM, declare=False)


@pytest.fixture
def registry_app(tmp_path):
    settings = RegistrySettings(registry=RegistryConfig(ask_enabled=False), _secrets_dir=str(tmp_path / "none"))
    return create_app(settings, AppPorts(state=MemoryState(), manifests=FakeManifests(), clock=Clock()))


async def test_events_in_decisions_out_and_bad_payloads_dead_lettered(registry_app) -> None:
    broker = registry_app.state.broker
    seen: dict[str, list[dict]] = {"promoted": [], "rejected": [], "dead": []}
    got_promoted = asyncio.Event()

    @broker.subscriber(ADAPTER_PROMOTED, stream=EVENTS)
    async def promoted(body: dict) -> None:
        seen["promoted"].append(body)
        got_promoted.set()

    @broker.subscriber(ADAPTER_REJECTED, stream=EVENTS)
    async def rejected(body: dict) -> None:
        seen["rejected"].append(body)

    @broker.subscriber(f"{DLQ_PREFIX}.registry.>", stream=JStream(DLQ_STREAM, declare=False))
    async def dead(body: Any) -> None:
        seen["dead"].append({"body": body})

    root = feedback()
    async with TestNatsBroker(broker) as br:
        await registry_app.state.runtime.attach()
        await br.publish(root.model_dump(mode="json"), FEEDBACK_SUBMITTED)
        await br.publish(evaluated(root, 0, 3, reward=0.3).model_dump(mode="json"), ADAPTER_EVALUATED)
        await br.publish(training_failed(root, 1, 3).model_dump(mode="json"), ADAPTER_TRAINING_FAILED)
        await br.publish(evaluated(root, 2, 3, reward=0.1).model_dump(mode="json"), ADAPTER_EVALUATED)
        await asyncio.wait_for(got_promoted.wait(), 5)
        await br.publish({"type": "adapter.evaluated", "scope": "acme"}, ADAPTER_EVALUATED)

        # Request-reply: the same queries the CLI makes over HTTP.
        reply = await br.request({"scope": "acme"}, f"{REGISTRY_RPC}.versions")
        versions = json.loads(reply.body)
        missing = json.loads((await br.request({"scope": "acme", "version": 9}, f"{REGISTRY_RPC}.lineage")).body)
        fate = json.loads((await br.request({"feedback_id": root.feedback_id}, f"{REGISTRY_RPC}.feedback")).body)
        invalid = json.loads((await br.request({"scope": "acme", "operator": "x"}, f"{REGISTRY_RPC}.rollback")).body)
        # arguments the HTTP API's paths would refuse: a clear 422, never a KV error or a timeout
        wildcard = json.loads((await br.request({"scope": "*"}, f"{REGISTRY_RPC}.feedback_list")).body)
        not_a_version = json.loads((await br.request({"scope": "acme", "version": "two"}, f"{REGISTRY_RPC}.lineage")).body)
        bad_id = json.loads((await br.request({"feedback_id": "a.>"}, f"{REGISTRY_RPC}.feedback")).body)
        misspelt = json.loads(
            (await br.request({"scope": "acme", "changes": {"aproval": "manual"}, "operator": "sre", "reason": "x"}, f"{REGISTRY_RPC}.policy_set")).body
        )
        listed = json.loads((await br.request({"scope": "acme", "limit": 1}, f"{REGISTRY_RPC}.feedback_list")).body)
        bad_state = json.loads((await br.request({"scope": "acme", "state": "done"}, f"{REGISTRY_RPC}.feedback_list")).body)
        bad_limit = json.loads((await br.request({"scope": "acme", "limit": 0}, f"{REGISTRY_RPC}.feedback_list")).body)
        few_versions = json.loads((await br.request({"scope": "acme", "limit": 0}, f"{REGISTRY_RPC}.versions")).body)
        unsigned = json.loads((await br.request({"scope": "acme", "changes": {"candidates": 2}}, f"{REGISTRY_RPC}.policy_set")).body)
        not_changes = json.loads((await br.request({"scope": "acme", "changes": "manual", "operator": "sre", "reason": "x"}, f"{REGISTRY_RPC}.policy_set")).body)

    assert [(p["version"], p["feedback_id"]) for p in seen["promoted"]] == [(1, root.feedback_id)]
    assert len(seen["rejected"]) == 2
    assert len(seen["dead"]) == 1
    assert versions["ok"] and [v["version"] for v in versions["result"]] == [1]
    assert missing == {"ok": False, "status": 404, "error": "scope 'acme' has no version 9"}
    assert unsigned == {"ok": False, "status": 422, "error": "missing argument 'operator'"}
    assert fate["ok"] and fate["result"]["state"] == "promoted"
    assert invalid["ok"] is False and invalid["status"] == 422
    assert (wildcard["status"], not_a_version["status"], bad_id["status"]) == (422, 422, 422)
    assert "scope must be a string matching" in wildcard["error"] and "version must be an integer" in not_a_version["error"]
    assert misspelt["status"] == 422 and "unknown policy setting(s): aproval" in misspelt["error"]
    assert few_versions["status"] == 422 and "limit must be from 1 to 1000" in few_versions["error"]
    assert not_changes["status"] == 422 and "changes must be an object" in not_changes["error"]
    assert listed["ok"] and [r["feedback_id"] for r in listed["result"]] == [root.feedback_id]
    assert bad_state["status"] == 422 and "awaiting_approval" in bad_state["error"]
    assert bad_limit["status"] == 422 and "limit must be from 1 to 1000" in bad_limit["error"]


async def test_operator_actions_over_request_reply_land_in_the_audit_subject(registry_app) -> None:
    broker = registry_app.state.broker
    audit: list[dict] = []
    heard = asyncio.Event()

    @broker.subscriber(OPERATOR_ACTION, stream=JStream(AUDIT_STREAM, declare=False))
    async def on_audit(body: dict) -> None:
        audit.append(body)
        heard.set()

    async with TestNatsBroker(broker) as br:
        ledger = await registry_app.state.runtime.attach()
        root = feedback()
        from services.registry import handlers

        await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2), ledger)
        reply = await br.request(
            {"scope": "acme", "operator": "sre-alice", "reason": "freeze"}, f"{REGISTRY_RPC}.pin"
        )
        await asyncio.wait_for(heard.wait(), 5)
    assert json.loads(reply.body)["result"]["pinned"] is True
    assert [(a["action"], a["operator"], a["reason"]) for a in audit] == [("pin", "sre-alice", "freeze")]
    assert ev.parse_event(audit[0]).type == "operator.action"


async def test_request_reply_takes_the_registrys_api_tokens_and_their_roles(tmp_path) -> None:
    """Who holds the NATS password to publish feedback cannot approve, pin or read dead letters over the
    bus without an operator's token: the same tokens and roles as the HTTP API, in the same header."""
    tokens = [{"name": "shop", "role": "producer", "token": "p" * 32}, {"name": "oncall", "role": "operator", "token": "o" * 32}]
    settings = RegistrySettings(registry=RegistryConfig(ask_enabled=False, api_tokens=tokens), _secrets_dir=str(tmp_path / "none"))
    app = create_app(settings, AppPorts(state=MemoryState(), manifests=FakeManifests(), clock=Clock()))
    audit: list[dict] = []
    heard = asyncio.Event()

    @app.state.broker.subscriber(OPERATOR_ACTION, stream=JStream(AUDIT_STREAM, declare=False))
    async def on_audit(body: dict) -> None:
        audit.append(body)
        heard.set()

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    pin = {"scope": "acme", "operator": "sre-alice", "reason": "freeze"}
    async with TestNatsBroker(app.state.broker) as br:
        ledger = await app.state.runtime.attach()
        from services.registry import handlers

        await handlers.on_adapter_evaluated(evaluated(feedback(), 0, 1, reward=0.2), ledger)
        bare = json.loads((await br.request(pin, f"{REGISTRY_RPC}.pin")).body)
        wrong = json.loads((await br.request(pin, f"{REGISTRY_RPC}.pin", headers=bearer("w" * 32))).body)
        short = json.loads((await br.request(pin, f"{REGISTRY_RPC}.pin", headers=bearer("p" * 32))).body)
        letters = json.loads((await br.request({}, f"{REGISTRY_RPC}.dead_letters", headers=bearer("p" * 32))).body)
        read = json.loads((await br.request({"scope": "acme"}, f"{REGISTRY_RPC}.versions", headers=bearer("p" * 32))).body)
        assert not audit  # nothing refused was applied
        done = json.loads((await br.request(pin, f"{REGISTRY_RPC}.pin", headers=bearer("o" * 32))).body)
        # a header name in any case, as over HTTP (NATS clients keep it as sent)
        lower = json.loads((await br.request({"scope": "acme"}, f"{REGISTRY_RPC}.versions",
                                             headers={"authorization": "bearer " + "p" * 32})).body)
        await asyncio.wait_for(heard.wait(), 5)
    assert (bare["status"], wrong["status"], short["status"], letters["status"]) == (401, 401, 403, 403)
    assert "Authorization: Bearer" in bare["error"] and "has the producer role" in short["error"]
    assert read["ok"] and done["ok"] and done["result"]["pinned"] is True and lower["ok"]
    assert [(a["action"], a["operator"]) for a in audit] == [("pin", "sre-alice (token oncall)")]
