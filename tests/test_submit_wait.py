"""`seal submit --wait` against a registry that refuses, restarts or stays silent (a mock transport)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from seal import client, submit
from seal.cli import app as seal_app

ACCEPTED = httpx.Response(202, json={"feedback_id": "fb-1", "event_id": "e-1", "scope": "acme", "duplicate": False})
PROMOTED = httpx.Response(200, json={"feedback_id": "fb-1", "state": "promoted", "version": 4, "reasons": []})
REJECTED = httpx.Response(200, json={"feedback_id": "fb-1", "state": "rejected", "reasons": ["core fell 3 points"]})


def registry(monkeypatch, post: httpx.Response, polls: list[httpx.Response | Exception]) -> list[str]:
    """A registry that answers ``post`` to the submission and then ``polls`` in turn (the last one repeats)."""
    seen: list[str] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            return post
        answer = polls.pop(0) if len(polls) > 1 else polls[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client, "client_factory", lambda url: httpx.Client(base_url=url, transport=httpx.MockTransport(reply)))
    monkeypatch.setattr(submit, "WAIT_POLL_S", 0.01)
    return seen


def run(*extra: str) -> Any:
    result = CliRunner().invoke(seal_app, ["submit", "-s", "acme", "--passage", "A fact.", "--url", "http://registry", *extra])
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize(("polls", "code", "said"), [
    ([PROMOTED], 0, "promoted as v4"),
    ([REJECTED], 1, "rejected: core fell 3 points"),
    ([httpx.Response(404, json={"detail": "unknown"})], 3, "not read by the registry yet"),
    # a registry restarting, or a proxy before it, is asked again until the outcome comes
    ([httpx.Response(503, json={"detail": "not ready"}), httpx.ConnectError("refused"), httpx.Response(502, text="bad gateway"), PROMOTED],
     0, "promoted as v4"),
    # refused while waiting (a token without the reader role): not the status of a rejection
    ([httpx.Response(403, json={"detail": "the token 'x' has the reader role"})], 4, "403"),
])
def test_the_exit_status_says_what_became_of_the_feedback(monkeypatch, polls, code, said) -> None:
    registry(monkeypatch, ACCEPTED, polls)
    result = run("--wait", "30")  # ended by the first terminal answer, not by the time
    assert result.exit_code == code, result.output
    assert said in " ".join(result.output.split())


@pytest.mark.parametrize("post", [
    httpx.Response(409, json={"detail": "feedback fb-1 was already submitted with other content"}),
    httpx.Response(422, json={"detail": "content: too long"}),
    httpx.Response(401, json={"detail": "needs an API token"}),
])
def test_feedback_refused_with_wait_is_4_not_rejected(monkeypatch, post) -> None:
    seen = registry(monkeypatch, post, [PROMOTED])
    result = run("--wait", "2")
    assert result.exit_code == 4 and str(post.status_code) in result.output
    assert seen == ["POST /v1/feedback"]  # never waited on
    assert run().exit_code == 1  # without --wait, as every other command


def test_a_registry_silent_to_the_end_is_unreachable_not_rejected(monkeypatch) -> None:
    registry(monkeypatch, ACCEPTED, [httpx.ConnectError("refused")])
    result = run("--wait", "1", "--json")
    assert result.exit_code == 4 and "cannot reach the registry" in " ".join(result.output.split())


def test_the_deadline_crossed_after_a_failed_ask_is_still_unreachable(monkeypatch) -> None:
    # The clock passes the deadline between a failed ask and the check after it: the last ask failed,
    # so the outcome is "cannot reach", never "undecided" (exit 3) by the timing of the clock.
    registry(monkeypatch, ACCEPTED, [httpx.ConnectError("refused")])
    ticks = iter([0.0, 0.5, 0.995])
    monkeypatch.setattr(submit.time, "monotonic", lambda: next(ticks, 0.995))
    monkeypatch.setattr(submit.time, "sleep", lambda seconds: None)
    result = run("--wait", "1")
    assert result.exit_code == 4 and "cannot reach the registry" in " ".join(result.output.split())
