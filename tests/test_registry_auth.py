"""The registry API's bearer tokens: settings, roles per route, the audit's name, and the CLI's token."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_registry_api import FakeAnswerer, _fine, _true
from test_registry_support import evaluated, feedback, make_world
from typer.testing import CliRunner

from seal import client
from seal.cli import app as seal_app
from services.registry import handlers
from services.registry.api import build_api
from services.registry.auth import Principal, Tokens, attributed
from services.registry.operations import Operations
from services.registry.settings import ApiToken, RegistryConfig, RegistrySettings
from shared import events as ev

READER = "r" * 32
PRODUCER = "p" * 32
OPERATOR = "o" * 32
CORRECTION = {"kind": "correction", "question": "Capital?", "right_answer": "Paris"}


def tokens() -> list[dict[str, str]]:
    return [{"name": "dashboards", "role": "reader", "token": READER},
            {"name": "shop-backend", "role": "producer", "token": PRODUCER},
            {"name": "oncall", "role": "operator", "token": OPERATOR}]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def guarded():
    """A registry with one held feedback in scope acme, its API behind three tokens."""
    w = make_world()
    await w.set_policy("acme", candidates=1)
    root = feedback(passage="Fact 0.")
    await handlers.on_feedback_submitted(root, w.ledger, "f" * 32)
    await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2), w.ledger)
    await w.set_policy("acme", candidates=1, approval="manual")
    held = feedback(passage="Held fact.")
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=1), w.ledger)
    configured = RegistryConfig.model_validate({"api_tokens": tokens()}).api_tokens
    app = build_api(Operations(lambda: w.ledger, w.bus, lambda: FakeAnswerer(w.ledger)), _fine, _true,
                    tokens=Tokens(configured))
    return w, app, held


def test_tokens_come_from_the_environment_or_a_secret_file(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SEAL_REGISTRY__API_TOKENS", json.dumps(tokens()))
    configured = RegistrySettings().registry.api_tokens
    assert [(t.name, t.role) for t in configured] == [("dashboards", "reader"), ("shop-backend", "producer"), ("oncall", "operator")]
    assert OPERATOR not in repr(configured)  # secrets never reach a log line
    monkeypatch.delenv("SEAL_REGISTRY__API_TOKENS")
    (tmp_path / "registry__api_tokens").write_text(json.dumps(tokens()[2:]))
    from_file = RegistrySettings(_secrets_dir=tmp_path).registry.api_tokens
    assert [(t.name, t.token.get_secret_value()) for t in from_file] == [("oncall", OPERATOR)]


@pytest.mark.parametrize(("changed", "message"), [
    ({"token": "short"}, "at least 24 characters"),
    ({"token": " " + "x" * 30}, "no surrounding spaces"),
    ({"role": "admin"}, "role"),
    ({"name": "on call"}, "name"),
])
def test_a_weak_or_misspelt_token_is_refused_at_start(changed: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ApiToken.model_validate({**tokens()[2], **changed})


@pytest.mark.parametrize("entry", [
    {"name": "oncall", "role": "operator", "token": " hidden-secret-value-0123456789"},
    {"name": "oncall", "role": "operator", "token": "hidden-secret"},
    {"name": "oncall", "role": "operator", "tokn": "hidden-secret-value-0123456789"},
])
def test_a_misconfigured_token_is_reported_without_its_secret(monkeypatch, entry: dict[str, str]) -> None:
    monkeypatch.setenv("SEAL_REGISTRY__API_TOKENS", json.dumps([entry]))
    with pytest.raises(ValidationError) as refused:
        RegistrySettings()
    assert "registry.api_tokens" in str(refused.value) and "hidden-secret" not in str(refused.value)


def test_two_tokens_with_one_name_or_one_secret_are_refused() -> None:
    with pytest.raises(ValidationError, match="same name"):
        RegistryConfig.model_validate({"api_tokens": [tokens()[0], {**tokens()[1], "name": "dashboards"}]})
    with pytest.raises(ValidationError, match="same secret"):
        RegistryConfig.model_validate({"api_tokens": [tokens()[0], {**tokens()[1], "token": READER}]})


def test_a_token_is_found_by_its_secret_and_ranks_by_role() -> None:
    found = Tokens(RegistryConfig.model_validate({"api_tokens": tokens()}).api_tokens)
    assert found.enabled and not Tokens().enabled
    assert found.principal(PRODUCER) == Principal("shop-backend", "producer")
    assert found.principal(PRODUCER + "x") is None and found.principal("") is None
    assert Principal("x", "operator").may("reader") and not Principal("x", "producer").may("operator")


def test_the_audit_name_keeps_the_callers_and_adds_the_tokens() -> None:
    oncall = Principal("oncall", "operator")
    assert attributed("alice", oncall) == "alice (token oncall)"
    assert attributed("oncall", oncall) == "oncall" and attributed("alice", None) == "alice"
    assert len(attributed("a" * 5000, oncall)) == 2000 and attributed("a" * 5000, oncall).endswith("(token oncall)")


async def test_without_a_known_token_only_health_and_docs_answer(guarded) -> None:
    _, app, held = guarded
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        assert http.get("/openapi.json").status_code == 200
        for method, path in [("GET", "/v1/scopes"), ("GET", f"/v1/feedback/{held.feedback_id}"), ("GET", "/v1/dead-letters"),
                             ("POST", "/v1/feedback"), ("POST", f"/v1/feedback/{held.feedback_id}/approve")]:
            bare = http.request(method, path, json={})
            assert bare.status_code == 401, (method, path)
            assert bare.headers["WWW-Authenticate"] == "Bearer"
            assert "Authorization: Bearer" in bare.json()["detail"] and "SEAL_API_TOKEN" in bare.json()["detail"]
            wrong = http.request(method, path, json={}, headers=bearer("w" * 32))
            assert wrong.status_code == 401 and "not one of this registry's tokens" in wrong.json()["detail"]
        assert http.get("/v1/scopes", headers={"Authorization": f"Basic {READER}"}).status_code == 401


async def test_a_body_past_the_bound_is_refused_before_it_is_read_whole(guarded) -> None:
    """The body is read before the token is checked: unbounded, anyone who can reach the API could
    hold gigabytes in the registry's memory."""
    from services.registry.api import MAX_BODY_BYTES

    _, app, _ = guarded
    with TestClient(app) as http:
        huge = http.post("/v1/feedback", content=b"x" * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"})
        assert huge.status_code == 413
        fits = http.post("/v1/feedback", json={"scope": "acme", "content": {"kind": "knowledge", "passage": "é" * 20_000}},
                         headers=bearer(PRODUCER))
        assert fits.status_code == 202, fits.text  # the longest passage, escaped, is within it


async def test_each_role_reaches_its_routes_and_no_further(guarded) -> None:
    w, app, held = guarded
    with TestClient(app) as http:
        assert [s["scope"] for s in http.get("/v1/scopes", headers=bearer(READER)).json()] == ["acme"]
        assert http.get("/v1/scopes/acme/policy", headers=bearer(READER)).status_code == 200
        refused = http.post("/v1/feedback", json={"scope": "acme", "content": CORRECTION}, headers=bearer(READER))
        assert refused.status_code == 403
        assert refused.json()["detail"] == "the token 'dashboards' has the reader role; to send feedback or ask needs the producer role"
        assert http.get("/v1/dead-letters", headers=bearer(PRODUCER)).status_code == 403  # whole events, content included

        assert http.post("/v1/feedback", json={"scope": "acme", "content": CORRECTION}, headers=bearer(PRODUCER)).status_code == 202
        assert http.post("/v1/scopes/acme/ask", json={"question": "When?"}, headers=bearer(PRODUCER)).json()["answer"] == "1387"
        for method, path in [("POST", f"/v1/feedback/{held.feedback_id}/approve"), ("POST", "/v1/scopes/acme/pin"),
                             ("PATCH", "/v1/scopes/acme/policy"), ("POST", "/v1/scopes/acme/rollback")]:
            assert http.request(method, path, json={}, headers=bearer(PRODUCER)).status_code == 403, (method, path)
        assert len(w.bus.of(ev.FeedbackSubmitted)) == 1 and not w.bus.of(ev.OperatorAction)  # nothing refused was applied
        assert w.bus.of(ev.FeedbackSubmitted)[0].submitted_by == "shop-backend"  # who sent it, as lineage shows
        http.post("/v1/feedback", json={"scope": "acme", "content": {**CORRECTION, "question": "Largest?"}, "submitted_by": "bot-7"},
                  headers=bearer(PRODUCER))
        assert w.bus.of(ev.FeedbackSubmitted)[-1].submitted_by == "bot-7 (token shop-backend)"

        approved = http.post(f"/v1/feedback/{held.feedback_id}/approve", json={"operator": "alice", "reason": "looks right"},
                             headers=bearer(OPERATOR))
        assert approved.status_code == 200 and approved.json()["state"] == "promoted"
        policy = http.patch("/v1/scopes/acme/policy", params={"operator": "oncall", "reason": "more"},
                            json={"candidates": 2}, headers=bearer(OPERATOR))
        assert policy.status_code == 200 and policy.json()["candidates"] == 2
    # who held the key is in the audit stream beside the name the caller gave
    assert [(a.action, a.operator) for a in w.bus.of(ev.OperatorAction)] == [
        ("approve", "alice (token oncall)"), ("set_policy", "oncall")]


async def test_the_cli_sends_seal_api_token(guarded, monkeypatch) -> None:
    w, app, held = guarded
    monkeypatch.setattr(client, "client_factory", lambda url: TestClient(app))
    monkeypatch.setenv("SEAL_OPERATOR", "alice")
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(seal_app, list(args))

    monkeypatch.delenv("SEAL_API_TOKEN", raising=False)
    without = run("approve", held.feedback_id, "--reason", "ok")
    assert without.exit_code == 1 and "SEAL_API_TOKEN" in " ".join(without.output.split())
    monkeypatch.setenv("SEAL_API_TOKEN", PRODUCER)
    submitted = run("submit", "--scope", "acme", "--question", "Capital?", "--answer", "Paris", "--wait", "1")
    assert submitted.exit_code == 3, submitted.output  # sent, and read back with the same token: not decided in 1 s
    assert "has the producer role" in " ".join(run("approve", held.feedback_id, "--reason", "ok").output.split())
    monkeypatch.setenv("SEAL_API_TOKEN", OPERATOR)
    assert run("approve", held.feedback_id, "--reason", "ok").exit_code == 0
    assert w.bus.of(ev.OperatorAction)[-1].operator == "alice (token oncall)"


def test_the_registry_service_takes_its_tokens_from_its_settings(monkeypatch, caplog) -> None:
    from services.registry.app import create_app

    monkeypatch.setenv("SEAL_REGISTRY__API_TOKENS", json.dumps(tokens()))
    http = TestClient(create_app(RegistrySettings()), raise_server_exceptions=False)  # not started: the guard alone
    assert http.get("/v1/scopes").status_code == 401
    assert http.get("/v1/scopes", headers=bearer(READER)).status_code != 401
    monkeypatch.delenv("SEAL_REGISTRY__API_TOKENS")
    with caplog.at_level("WARNING", logger="services.registry.app"):
        create_app(RegistrySettings(http_host="0.0.0.0"))
    assert "has no tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="services.registry.app"):
        create_app(RegistrySettings(http_host="127.0.0.1"))
    assert "has no tokens" not in caplog.text
