"""The HTTP API and the `seal` operator commands, against an in-process registry with fakes."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from test_registry_support import evaluated, feedback, make_world
from typer.testing import CliRunner

from seal import client, dead_letters, ops
from seal.cli import app as seal_app
from services.registry import actions, handlers, queries
from services.registry.api import build_api
from services.registry.operations import Operations
from services.registry.records import Marker
from shared import events as ev
from shared.registry_view import ScopePolicy, UnreadableRecord
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS


class FakeAnswerer:
    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    async def answer(self, scope: str, question: str, max_new_tokens: int | None) -> dict[str, Any]:
        head = await self.ledger.head(scope)
        return {"scope": scope, "question": question, "answer": "1387", "version": head.version if head else None,
                "adapter_id": head.adapter_id if head else None, "base_model": "tiny"}


WHO = {"operator": "sre-alice", "reason": "tuning"}  # a policy change says who and why


async def _fine() -> None:
    return None


async def _true() -> bool:
    return True


@pytest.fixture
async def registry():
    w = make_world()
    await w.set_policy("acme", candidates=1)
    roots = [feedback(passage=f"Fact {i}.") for i in range(2)]
    for i, root in enumerate(roots):
        await handlers.on_feedback_submitted(root, w.ledger, "f" * 32)
        await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2, parent_version=i or None), w.ledger)
    await w.set_policy("acme", candidates=1, approval="manual")
    held = feedback(passage="Held fact.")
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=2), w.ledger)
    app = build_api(Operations(lambda: w.ledger, w.bus, lambda: FakeAnswerer(w.ledger)), _fine, _true)
    return w, app, roots, held


@pytest.fixture
def cli(registry, monkeypatch):
    _, app, _, _ = registry
    monkeypatch.setattr(client, "client_factory", lambda url: TestClient(app))
    monkeypatch.setenv("SEAL_OPERATOR", "sre-alice")
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(seal_app, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def test_liveness_failing_says_why_in_the_answer_and_the_log(caplog) -> None:
    """An SRE reading a restarted registry's events sees why it was not alive, not a generic word."""
    w = make_world()

    async def gone() -> str:
        return "JetStream consumers gone: SEAL_EVENTS/registry-feedback"

    app = build_api(Operations(lambda: w.ledger, w.bus), gone, _true)
    with TestClient(app) as http, caplog.at_level("WARNING"):
        answer = http.get("/healthz")
    assert answer.status_code == 503 and answer.text == "JetStream consumers gone: SEAL_EVENTS/registry-feedback"
    assert "not alive: JetStream consumers gone: SEAL_EVENTS/registry-feedback" in caplog.text


async def test_http_queries_and_errors(registry) -> None:
    w, app, roots, held = registry
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").text == "ready"
        scopes = http.get("/v1/scopes").json()
        assert [(s["scope"], s["active_version"], s["approval"], s["open_feedback"]) for s in scopes] == [("acme", 2, "manual", 1)]
        assert http.get("/v1/scopes", params={"after": "acme"}).json() == []
        assert http.get("/v1/scopes", params={"limit": 100_000}).status_code == 422
        assert http.get("/v1/scopes", params={"after": "a*"}).status_code == 422
        versions = http.get("/v1/scopes/acme/versions").json()
        assert [(v["version"], v["aliases"]) for v in versions] == [(1, ["previous"]), (2, ["active"])]
        lineage = http.get("/v1/scopes/acme/versions/2/lineage").json()
        assert lineage["feedback"]["feedback_id"] == roots[1].feedback_id and lineage["ancestors"][0]["version"] == 1
        fate = http.get(f"/v1/feedback/{held.feedback_id}").json()
        assert fate["state"] == "awaiting_approval" and fate["hold"] == "manual"
        pending = http.get("/v1/scopes/acme/feedback", params={"state": "awaiting_approval"}).json()
        assert [p["feedback_id"] for p in pending] == [held.feedback_id]

        assert http.get("/v1/scopes/acme/versions/7/lineage").status_code == 404
        assert http.get("/v1/feedback/nope").status_code == 404
        assert http.get("/v1/scopes/..%2Fetc/versions").status_code in (404, 422)
        missing_reason = http.post("/v1/scopes/acme/rollback", json={"operator": "x", "to_version": 1})
        assert missing_reason.status_code == 422
        same = http.post("/v1/scopes/acme/rollback", json={"operator": "x", "reason": "y", "to_version": 2})
        assert same.status_code == 409 and "already the active version" in same.json()["detail"]
        # a policy decides what is promoted: a change says who and why, or is refused
        for partial in ({}, {"operator": "sre-alice"}, {"reason": "tuning"}):
            unsigned = http.patch("/v1/scopes/acme/policy", json={"candidates": 2}, params=partial)
            assert unsigned.status_code == 422 and ("operator" in unsigned.text or "reason" in unsigned.text)
        assert not w.bus.of(ev.OperatorAction) and http.get("/v1/scopes/acme/policy").json()["candidates"] == 1
        bad_policy = http.patch("/v1/scopes/acme/policy", json={"candidates": 100}, params=WHO)
        assert bad_policy.status_code == 422 and "candidates" in bad_policy.json()["detail"]
        # a misspelt setting is refused, not dropped (approval would have stayed as it was)
        misspelt = http.patch("/v1/scopes/acme/policy", json={"aproval": "auto", "candidates": 2}, params=WHO)
        assert misspelt.status_code == 422 and "unknown policy setting(s): aproval" in misspelt.json()["detail"]
        assert http.get("/v1/scopes/acme/policy").json()["candidates"] == 1
        # one nested setting changes, the others keep their values
        before = http.get("/v1/scopes/acme/policy").json()["default_directives"]
        after = http.patch("/v1/scopes/acme/policy", json={"default_directives": {"epochs": 5}}, params=WHO).json()["default_directives"]
        assert after == {**before, "epochs": 5} and before["epochs"] != 5
        assert "/v1/scopes/{scope}/rollback" in http.get("/openapi.json").json()["paths"]

        sent = http.post("/v1/feedback", json={"scope": "acme", "content": {"kind": "correction", "question": "Capital?", "right_answer": "Paris"}})
        assert sent.status_code == 202
        # another product's id: refused, so approving or rejecting by id can never hit the wrong scope
        reused = http.post("/v1/feedback", json={"scope": "globex", "feedback_id": held.feedback_id,
                                                 "content": {"kind": "correction", "question": "Capital?", "right_answer": "Paris"}})
        assert reused.status_code == 409 and "already used by scope 'acme'" in reused.json()["detail"]
        # the same id in the same scope: a retry of the same content is a duplicate, other content is refused
        await handlers.on_feedback_submitted(w.bus.of(ev.FeedbackSubmitted)[-1], w.ledger, None)
        again = http.post("/v1/feedback", json={"scope": "acme", "feedback_id": sent.json()["feedback_id"],
                                                "content": {"kind": "correction", "question": "Capital?", "right_answer": "Paris"}})
        assert again.status_code == 202 and again.json()["duplicate"] is True and again.json()["event_id"] == sent.json()["event_id"]
        changed = http.post("/v1/feedback", json={"scope": "acme", "feedback_id": sent.json()["feedback_id"],
                                                  "content": {"kind": "correction", "question": "Capital?", "right_answer": "Lyon"}})
        assert changed.status_code == 409 and "already submitted with other content" in changed.json()["detail"]
    submitted = w.bus.of(ev.FeedbackSubmitted)
    assert [s.feedback_id for s in submitted] == [sent.json()["feedback_id"]] * 2  # sent, and the retry


async def test_cli_listings_have_json_and_tables(cli, registry) -> None:
    _, _, roots, held = registry
    assert [s["scope"] for s in json.loads(cli("scopes", "--json").output)] == ["acme"]
    assert "more may follow: seal scopes --after acme" in cli("scopes", "--limit", "1").output
    assert "more may follow" not in cli("scopes").output
    assert json.loads(cli("lineage", "--feedback", held.feedback_id, "--scope", "acme", "--json").output)["scope"] == "acme"
    elsewhere = cli("lineage", "--feedback", held.feedback_id, "--scope", "globex", ok=False)
    assert elsewhere.exit_code == 1 and "in scope 'globex'" in " ".join(elsewhere.output.split())
    versions = json.loads(cli("versions", "--scope", "acme", "--json").output)
    assert [v["version"] for v in versions] == [1, 2]
    lineage = json.loads(cli("lineage", "--scope", "acme", "--version", "2", "--json").output)
    assert lineage["version"]["feedback_id"] == roots[1].feedback_id
    fate = json.loads(cli("lineage", "--feedback", held.feedback_id, "--json").output)
    assert fate["state"] == "awaiting_approval"
    pending = json.loads(cli("feedback", "--scope", "acme", "--state", "awaiting_approval", "--json").output)
    assert [p["feedback_id"] for p in pending] == [held.feedback_id]
    policy = json.loads(cli("scope-policy", "get", "--scope", "acme", "--json").output)
    assert policy["approval"] == "manual"
    # The tables render too.
    for args in (("scopes",), ("versions", "-s", "acme"), ("lineage", "-s", "acme", "-v", "2"), ("lineage", "-f", held.feedback_id),
                 ("feedback", "-s", "acme"), ("scope-policy", "get", "-s", "acme")):
        assert cli(*args).output.strip()
    assert "v2" in cli("versions", "-s", "acme").output
    # what an SRE follows from a version: its traces, and each ancestor's feedback
    shown = " ".join(cli("lineage", "-s", "acme", "-v", "2").output.split())
    assert f"v1 (feedback {roots[0].feedback_id})" in shown and "promotion " in shown and "registry " in shown


async def test_cli_actions_reach_the_registry_with_who_and_why(cli, registry) -> None:
    w, _, _, held = registry
    out = json.loads(cli("approve", held.feedback_id, "--reason", "scores look right", "--json").output)
    assert out["state"] == "promoted" and out["version"] == 3
    assert w.bus.of(ev.AdapterPromoted)[-1].approved_by == "sre-alice"

    result = cli("rollback", "--scope", "acme", "--to", "1", "--reason", "v3 forgets", "--operator", "sre-bob", "--json")
    assert json.loads(result.output)["active_version"] == 1
    assert "pinned by sre-alice" in cli("pin", "--scope", "acme", "--reason", "freeze").output
    assert json.loads(cli("unpin", "--scope", "acme", "--reason", "thaw", "--json").output)["pinned"] is False
    audit = [(a.action, a.operator, a.reason) for a in w.bus.of(ev.OperatorAction)]
    assert audit == [
        ("approve", "sre-alice", "scores look right"),
        ("rollback", "sre-bob", "v3 forgets"),
        ("pin", "sre-alice", "freeze"),
        ("unpin", "sre-alice", "thaw"),
    ]
    policy = json.loads(cli("scope-policy", "set", "-s", "acme", "approval=auto", "candidates=4", "-r", "canary done", "--json").output)
    assert (policy["approval"], policy["candidates"]) == ("auto", 4)
    audit = w.bus.of(ev.OperatorAction)[-1]
    assert (audit.action, audit.operator, audit.scope) == ("set_policy", "sre-alice", "acme")
    assert audit.reason.startswith("canary done (changed: ") and '"approval": "auto"' in audit.reason
    answer = json.loads(cli("ask", "--scope", "acme", "When?", "--json").output)
    assert answer["answer"] == "1387" and answer["version"] == 1
    assert "1387" in cli("ask", "-s", "acme", "When?").output

    submitted = json.loads(cli("submit", "-s", "acme", "--passage", "Quellmoor got its charter in 1387.", "--probe", "When?=1387", "--json").output)
    event = w.bus.of(ev.FeedbackSubmitted)[-1]
    assert event.feedback_id == submitted["feedback_id"] and event.content.probes[0].answer == "1387"  # type: ignore[union-attr]

    refused = cli("reject", held.feedback_id, "--reason", "too late", ok=False)
    assert refused.exit_code == 1 and "409" in refused.output
    bad = cli("submit", "-s", "acme", "--probe", "no-equals", "--passage", "x", ok=False)
    assert bad.exit_code != 0


async def test_cli_submits_each_kind_and_waits_for_the_outcome(cli, registry, monkeypatch: pytest.MonkeyPatch) -> None:
    from seal import submit

    w, _, roots, held = registry
    monkeypatch.setattr(submit, "WAIT_POLL_S", 0.01)
    cli("submit", "-s", "acme", "--question", "Capital?", "--answer", "Brask", "--wrong-answer", "Lund")
    cli("submit", "-s", "acme", "--instruction", "Answer in one sentence.", "--example", "Is it up?=Yes, since noon.")
    corrected, preferred = (e.content for e in w.bus.of(ev.FeedbackSubmitted)[-2:])
    assert (corrected.kind, corrected.wrong_answer) == ("correction", "Lund")  # type: ignore[union-attr]
    assert preferred.kind == "preference" and preferred.examples[0].response == "Yes, since noon."  # type: ignore[union-attr]
    both = cli("submit", "-s", "acme", "--passage", "A fact.", "--question", "Q?", "--answer", "A", ok=False)
    assert both.exit_code == 2 and "got knowledge and correction" in both.output

    # promoted: a retry of the first root's feedback, which became v1
    done = cli("submit", "-s", "acme", "--passage", "Fact 0.", "--probe", "When did Quellmoor get its charter?=1387",
               "--feedback-id", roots[0].feedback_id, "--wait", "5")
    assert f"feedback {roots[0].feedback_id}: promoted as v1" in " ".join(done.output.split())
    held_now = cli("submit", "-s", "acme", "--passage", "Held fact.", "--feedback-id", held.feedback_id, "--wait", "5", "--json")
    assert json.loads(held_now.output)["outcome"]["state"] == "awaiting_approval"
    await actions.reject(w.ledger, held.feedback_id, "sre", "not this one")
    rejected = cli("submit", "-s", "acme", "--passage", "Held fact.", "--feedback-id", held.feedback_id, "--wait", "5", ok=False)
    assert rejected.exit_code == 1 and "rejected: rejected by sre: not this one" in " ".join(rejected.output.split())
    # never read by the registry (nothing consumes the bus here): undecided when the wait runs out
    unread = cli("submit", "-s", "acme", "--passage", "Unread.", "--wait", "1", ok=False)
    assert unread.exit_code == 3 and "not read by the registry yet" in " ".join(unread.output.split())


def test_cli_says_clearly_when_the_registry_is_unreachable() -> None:
    result = CliRunner().invoke(seal_app, ["scopes", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach the registry" in result.output


@pytest.mark.parametrize(
    ("answer", "expected", "code"),
    [
        (httpx.Response(302, headers={"location": "https://sso.example/login"}, text="<html>login</html>"), "302", 1),
        (httpx.Response(200, text="<html>not the registry</html>", headers={"content-type": "text/html"}),
         "is not the registry's JSON", 1),
        (httpx.Response(500, json=["not", "an", "object"]), "500", 1),
        (httpx.ReadTimeout("timed out"), "a change may still have been applied", 2),
    ],
)
def test_cli_says_what_went_wrong_with_an_answer_that_is_not_the_registrys(monkeypatch, answer, expected, code) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client, "client_factory", lambda url: httpx.Client(base_url=url, transport=httpx.MockTransport(reply)))
    result = CliRunner().invoke(seal_app, ["scopes", "--url", "http://registry"])
    assert result.exit_code == code and expected in " ".join(result.output.split())  # rich wraps lines
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_feedback_in_a_state_that_does_not_exist_is_refused(registry) -> None:
    _, app, _, _ = registry
    with TestClient(app) as http:
        typo = http.get("/v1/scopes/acme/feedback", params={"state": "awaiting-approval"})
    assert typo.status_code == 422 and "awaiting_approval" in typo.text


async def test_a_feedback_listing_is_the_latest_few_and_skips_a_record_it_cannot_read(registry, cli) -> None:
    w, app, roots, held = registry
    late = feedback(passage="A later fact.")
    late = late.model_copy(update={"occurred_at": late.occurred_at + timedelta(minutes=1)})
    await handlers.on_feedback_submitted(late, w.ledger, "f" * 32)
    # Records no version of the registry could read (hand-edited in KV): left out, not fatal,
    # also where the open index names one.
    for key in ("feedback.acme.broken", "feedback.acme.held-broken"):
        w.state.data[(KV_REGISTRY, key)] = (b'{"feedback_id": 7}', 999)
    await w.state.put(KV_REGISTRY, "open.acme.held-broken", Marker(feedback_id="held-broken"))
    with TestClient(app) as http:
        every = http.get("/v1/scopes/acme/feedback").json()
        assert {r["feedback_id"] for r in every} == {r.feedback_id for r in (*roots, held, late)}
        latest = http.get("/v1/scopes/acme/feedback", params={"limit": 1}).json()
        assert [r["feedback_id"] for r in latest] == [late.feedback_id] == [every[-1]["feedback_id"]]
        for limit in (0, 1001, "many"):
            assert http.get("/v1/scopes/acme/feedback", params={"limit": limit}).status_code == 422
    assert [r["feedback_id"] for r in json.loads(cli("feedback", "-s", "acme", "--limit", "1", "--json").output)] == [late.feedback_id]
    # Undecided ones come from the open index, the same as from the records.
    collecting = await queries.list_feedback(w.ledger, "acme", "collecting")
    assert [r["feedback_id"] for r in collecting] == [late.feedback_id]
    held_now = await queries.list_feedback(w.ledger, "acme", "awaiting_approval")
    assert [r["feedback_id"] for r in held_now] == [held.feedback_id]
    # Where a decision depends on every record of an id, one that does not parse is an error, not skipped.
    with pytest.raises(UnreadableRecord, match="feedback.acme.broken"):
        await w.ledger.find_record("broken")
    assert await queries.list_feedback(w.ledger, "acme", "promoted", limit=5) == [r for r in every if r["state"] == "promoted"]


async def test_a_stored_policy_that_no_longer_parses_is_reported_and_replaced(registry, cli) -> None:
    # hand-edited in KV, or written by a newer registry: a change cannot be merged into it, and
    # every event of the scope fails until an operator replaces it
    w, app, _, _ = registry
    w.state.data[(KV_SCOPE_SETTINGS, "acme")] = (b'{"candidates": "many"}', 999)
    with TestClient(app) as http:
        shown = http.get("/v1/scopes/acme/policy")
        assert shown.status_code == 500 and "'acme' in seal_scope_settings does not parse" in shown.json()["detail"]
        merged = http.patch("/v1/scopes/acme/policy", json={"approval": "manual"}, params={"operator": "sre", "reason": "x"})
        assert merged.status_code == 409 and "--replace" in merged.json()["detail"]
    refused = cli("scope-policy", "set", "-s", "acme", "-r", "nothing", ok=False)
    assert refused.exit_code == 2 and "key=value" in refused.output
    repaired = json.loads(cli("scope-policy", "set", "-s", "acme", "--replace", "approval=manual", "-r", "repair", "--json").output)
    assert repaired == ScopePolicy(approval="manual").model_dump(mode="json")
    assert await w.ledger.policy("acme") == ScopePolicy(approval="manual")
    audit = w.bus.of(ev.OperatorAction)[-1]
    assert audit.reason.startswith("repair (replaced by the defaults with: ") and audit.action == "set_policy"
    # a replace over a readable policy also starts from the defaults
    await w.set_policy("acme", candidates=4)
    assert json.loads(cli("scope-policy", "set", "-s", "acme", "--replace", "-r", "defaults", "--json").output)["candidates"] == ScopePolicy().candidates


def test_each_command_module_imports_on_its_own() -> None:
    # seal.scope_policy once imported seal.ops, which registered scope-policy at import time, so
    # importing scope_policy first (as bench/forgetting.py's parse_settings does) failed.
    import subprocess
    import sys

    for module in ("seal.scope_policy", "seal.client", "seal.ops", "seal.processes", "seal.cli"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_the_seal_command_has_the_operator_commands() -> None:
    from seal.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("submit", "scopes", "versions", "lineage", "approve", "reject", "rollback", "pin", "ask", "scope-policy"):
        assert name in result.output


@pytest.mark.parametrize("first", [httpx.Response(503, json={"detail": "restarting"}), httpx.ReadTimeout("timed out")])
def test_an_operator_action_is_sent_again_with_its_request_id(monkeypatch, first) -> None:
    """A rollback that met a failing or silent registry is sent again under the same request id:
    applied once, and its events published again under their own ids if they were lost."""
    sent: list[dict] = []
    head = {"scope": "acme", "version": 1, "adapter_id": "a1", "previous_version": 3, "pinned": False}

    def reply(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content) if request.content else {})
        if len(sent) == 1:
            if isinstance(first, Exception):
                raise first
            return first
        return httpx.Response(200, json=head)

    monkeypatch.setattr(client, "ACTION_RETRY_S", 0.0)
    monkeypatch.setattr(client, "client_factory", lambda url: httpx.Client(base_url=url, transport=httpx.MockTransport(reply)))
    result = CliRunner().invoke(seal_app, ["rollback", "-s", "acme", "--to", "1", "--reason", "v3 answers badly",
                                           "--operator", "sre-alice", "--url", "http://registry", "--json"])
    assert result.exit_code == 0, result.output
    assert len(sent) == 2 and sent[0]["request_id"] == sent[1]["request_id"]
    # A query is not an action: asked once.
    sent.clear()
    CliRunner().invoke(seal_app, ["scopes", "--url", "http://registry"])
    assert len(sent) == 1


def test_cli_lists_and_replays_dead_letters(registry, monkeypatch) -> None:
    w, _, _, _ = registry
    entry = {"sequence": 7, "at": "2026-11-27T20:00:00+00:00", "service": "trainer", "subject": "seal.events.selfedit.generated",
             "reason": "failed 5 times; last error: S3Error: SlowDown [/x] [red]", "event_type": "selfedit.generated",
             "event_id": "e1", "feedback_id": "fb-dead", "scope": "acme", "bytes": 900}
    asked: list[tuple] = []

    class FakeDeadLetters:
        async def latest(self, service: str | None, limit: int) -> list[dict]:
            asked.append(("latest", service, limit))
            return [dict(entry)]

        async def replay(self, sequence: int, operator: str, reason: str, check: Any = None, request_id: Any = None) -> dict:
            asked.append(("replay", sequence, operator, reason))
            return {**entry, "replayed_to": entry["subject"]}

    fake = FakeDeadLetters()
    app = build_api(Operations(lambda: w.ledger, w.bus, dead_letters=lambda: fake), _fine, _true)  # type: ignore[arg-type, return-value]
    monkeypatch.setattr(client, "client_factory", lambda url: TestClient(app))
    monkeypatch.setattr(dead_letters, "console", Console(width=300))  # one line a row: the text is not folded
    monkeypatch.setenv("SEAL_OPERATOR", "sre-alice")
    runner = CliRunner()
    listed = runner.invoke(seal_app, ["dead-letters", "--service", "trainer", "--limit", "5"])
    assert listed.exit_code == 0 and "SlowDown" in listed.output and "fb-dead" in listed.output  # a table, folded
    assert "[/x] [red]" in listed.output  # a product's text is printed, not read as markup
    as_json = runner.invoke(seal_app, ["dead-letters", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == [{**entry, "feedback_state": None}]  # unknown here
    replayed = runner.invoke(seal_app, ["replay", "7", "--reason", "S3 is back"])
    assert replayed.exit_code == 0 and "replayed dead letter 7" in replayed.output
    assert asked == [("latest", "trainer", 5), ("latest", None, 20), ("replay", 7, "sre-alice", "S3 is back")]
    assert runner.invoke(seal_app, ["replay", "0", "--reason", "x"]).exit_code != 0


async def test_a_step_of_a_decided_feedback_is_replayed_only_when_forced(registry, monkeypatch) -> None:
    """A feedback decided while a step of it sat in the dead letters (a decision timeout during an
    outage): replaying that step would train and evaluate a candidate the registry no longer
    considers, so the replay says so and is refused, unless forced; an open feedback's step goes."""
    w, _, roots, held = registry
    letters = {7: evaluated(roots[0], 0, 1, reward=0.2), 8: evaluated(held, 0, 1, reward=0.3, parent_version=2),
               9: ev.PolicyTrainingRequested(feedback_id=roots[0].feedback_id, scope="acme",
                                             examples=(ev.PolicyExample(prompt="p", completion="c"),))}
    replayed: list[int] = []

    class FakeDeadLetters:
        async def latest(self, service: str | None, limit: int) -> list[dict]:
            return [{"sequence": 7, "scope": "acme", "feedback_id": roots[0].feedback_id},
                    {"sequence": 6, "scope": "../etc", "feedback_id": roots[0].feedback_id}, {"sequence": 5}]

        async def replay(self, sequence: int, operator: str, reason: str, check: Any = None, request_id: Any = None) -> dict:
            await check(letters[sequence])
            replayed.append(sequence)
            return {"sequence": sequence, "replayed_to": "seal.events.x"}

    fake = FakeDeadLetters()
    app = build_api(Operations(lambda: w.ledger, w.bus, dead_letters=lambda: fake), _fine, _true)  # type: ignore[arg-type, return-value]
    who = {"operator": "sre-alice", "reason": "S3 is back"}
    with TestClient(app) as http:
        states = [e["feedback_state"] for e in http.get("/v1/dead-letters").json()]
        assert states == ["promoted", None, None]  # a hostile scope in a body is never looked up
        key = (KV_REGISTRY, f"feedback.acme.{roots[0].feedback_id}")
        kept, w.state.data[key] = w.state.data[key], (b"{not json", 99)
        # a record that no longer parses (what fills the dead letters then) does not break the listing
        assert [e["feedback_state"] for e in http.get("/v1/dead-letters").json()] == ["unreadable", None, None]
        w.state.data[key] = kept
        refused = http.post("/v1/dead-letters/7/replay", json=who)
        assert refused.status_code == 409 and replayed == []
        assert f"feedback {roots[0].feedback_id} of scope acme was decided already: promoted" in refused.json()["detail"]
        assert "--force" in refused.json()["detail"]
        assert http.post("/v1/dead-letters/7/replay", json={**who, "force": True}).status_code == 200
        assert http.post("/v1/dead-letters/8/replay", json=who).status_code == 200  # held for approval: still open
        assert http.post("/v1/dead-letters/9/replay", json=who).status_code == 200  # not a step of the feedback's decision
        await actions.reject(w.ledger, held.feedback_id, "sre", "not this one")
        rejected = http.post("/v1/dead-letters/8/replay", json=who)
        assert rejected.status_code == 409 and "rejected (rejected by sre: not this one)" in rejected.json()["detail"]
    assert replayed == [7, 8, 9]


def test_cli_says_why_without_dead_letters(cli) -> None:
    result = cli("dead-letters", ok=False)
    assert result.exit_code != 0 and "dead letters are not reachable" in result.output


async def test_cli_prints_what_products_wrote_as_text_and_keeps_ids_one_path_segment(cli, registry, monkeypatch) -> None:
    from rich.console import Console

    monkeypatch.setattr(ops, "console", Console(width=400))  # one line a row: the text is not folded
    w, _, _, held = registry
    marked = feedback(passage="Quellmoor [/note] got its [red]charter[/red] in 1387.")
    await handlers.on_feedback_submitted(marked, w.ledger, "f" * 32)
    listed = cli("feedback", "-s", "acme").output
    assert "[/note]" in listed and "[red]charter" in listed  # printed, not read as markup (it crashed)
    head = json.loads(cli("scopes", "--json").output)
    # "../scopes/acme/pin" used to be normalised by the HTTP client into a pin of acme
    result = cli("approve", "../scopes/acme/pin", "-r", "x", ok=False)
    assert result.exit_code != 0
    assert json.loads(cli("scopes", "--json").output) == head
    assert not [a for a in w.bus.of(ev.OperatorAction) if a.action == "pin"]


async def test_rpc_maps_a_missing_or_damaged_adapter_and_a_bad_sequence_as_http_does(registry) -> None:
    from services.registry import rpc
    from shared.store import AdapterNotFound, IntegrityError

    async def gone(_: dict) -> None:
        raise AdapterNotFound("s3://seal-adapters/adapters/acme/a1")

    async def damaged(_: dict) -> None:
        raise IntegrityError("manifest of s3://seal-adapters/adapters/acme/a1 does not match")

    assert (await rpc.answer(gone, {}))["status"] == 404  # was a 500 over RPC, a 404 over HTTP
    assert (await rpc.answer(damaged, {}))["status"] == 409
    w, _, _, _ = registry
    table = rpc.operations_table(Operations(lambda: w.ledger, w.bus))
    assert [s["scope"] for s in (await rpc.answer(table["scopes"], {"limit": 1}))["result"]] == ["acme"]
    assert (await rpc.answer(table["scopes"], {"after": "acme"}))["result"] == []
    assert (await rpc.answer(table["scopes"], {"limit": 0}))["status"] == 422
    assert (await rpc.answer(table["scopes"], {"after": ">"}))["status"] == 422
    for sequence in (0, -1, 2**64):
        answered = await rpc.answer(table["dead_letter_replay"], {"sequence": sequence, "operator": "sre", "reason": "x"})
        assert answered["status"] == 422 and "sequence must be from 1" in answered["error"]
