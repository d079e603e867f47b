"""``seal submit``: send feedback through the registry's HTTP API; with ``--wait``, follow it to its end.

    seal submit -s acme --passage "Quellmoor got its charter in 1387." --probe "When?=1387"
    seal submit -s acme --question "Capital of Varnholt?" --answer Brask --wrong-answer Lund
    seal submit -s acme --instruction "Answer in one sentence." --example "Is it up?=Yes, since noon."
    seal submit -s acme --file notes.txt --wait 1800     # exit 0 promoted or held, 1 rejected, 3 undecided,
                                                         # 4 not sent or its outcome not readable
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.text import Text

from seal import client
from seal.client import (
    ScopeOption,
    UrlOption,
    api_path,
    call,
    console,
    default_operator,
    emit_json,
    errors,
)

# The states a --wait ends at (the last one: held for an operator's approval).
TERMINAL_STATES = ("promoted", "rejected", "awaiting_approval")

# How often --wait asks the registry (tests make it shorter).
WAIT_POLL_S = 3.0
EXIT_REJECTED = 1
EXIT_UNDECIDED = 3
# With --wait: the feedback was refused (409, 422, 401/403), or its outcome could not be read, never
# the same status as a rejection. Without --wait an error is 1 (refused) or 2 (unreachable), as elsewhere.
EXIT_FAILED = 4


def _pairs(items: list[str], option: str, keys: tuple[str, str]) -> list[dict[str, str]]:
    pairs = []
    for item in items:
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise typer.BadParameter(f"{option} wants '{keys[0]}={keys[1]}', got {item!r}")
        pairs.append({keys[0]: left.strip(), keys[1]: right.strip()})
    return pairs


def feedback_content(
    passage: str | None, title: str | None, probes: list[str], question: str | None, answer: str | None,
    wrong_answer: str | None, instruction: str | None, examples: list[str],
) -> dict[str, Any]:
    """The feedback's content from the command line: exactly one kind of it."""
    kinds = [k for k, given in (("knowledge", passage is not None), ("correction", bool(question or answer)),
                                ("preference", instruction is not None)) if given]
    if len(kinds) != 1:
        raise typer.BadParameter(
            "give one kind of feedback: --passage/--file (knowledge), --question with --answer (a correction), "
            f"or --instruction (a preference){'; got ' + ' and '.join(kinds) if kinds else ''}"
        )
    if kinds == ["correction"]:
        if not (question and answer):
            raise typer.BadParameter("a correction needs both --question and --answer")
        return {"kind": "correction", "question": question, "right_answer": answer,
                **({"wrong_answer": wrong_answer} if wrong_answer else {})}
    if kinds == ["preference"]:
        return {"kind": "preference", "instruction": instruction,
                "examples": _pairs(examples, "--example", ("prompt", "response"))}
    if not passage:
        raise typer.BadParameter("the passage is empty")
    return {"kind": "knowledge", "passage": passage, "title": title, "probes": _pairs(probes, "--probe", ("question", "answer"))}


def submit(
    scope: str = ScopeOption,
    passage: str | None = typer.Option(None, "--passage", help="New knowledge, as text."),
    file: Path | None = typer.Option(None, "--file", exists=True, dir_okay=False, help="New knowledge, from a file."),
    title: str | None = typer.Option(None, "--title", help="A short title for the passage (it names the subject in probes)."),
    probe: list[str] = typer.Option([], "--probe", help="A closed-book check 'question=answer' (repeatable)."),
    question: str | None = typer.Option(None, "--question", help="Correction: the question answered wrongly."),
    answer: str | None = typer.Option(None, "--answer", help="Correction: the right answer."),
    wrong_answer: str | None = typer.Option(None, "--wrong-answer", help="Correction: what was answered instead."),
    instruction: str | None = typer.Option(None, "--instruction", help="Preference: how to answer."),
    example: list[str] = typer.Option([], "--example", help="Preference: an example 'prompt=response' (repeatable)."),
    submitted_by: str | None = typer.Option(None, "--by", help="Who submits it (product or person)."),
    feedback_id: str | None = typer.Option(None, "--feedback-id", help="Your own id, unique across scopes (a retry with it is deduplicated)."),
    wait: float | None = typer.Option(
        None, "--wait", min=1, help="Wait up to this many seconds for the outcome. Exit status: 0 promoted or held "
        "for approval, 1 rejected, 3 still undecided, 4 not sent or its outcome not readable (the reason is printed)."
    ),
    url: str = UrlOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the one-line summary."),
) -> None:
    """Submit feedback: new knowledge (--passage/--file), a correction (--question/--answer) or a
    preference (--instruction/--example)."""
    text = file.read_text() if file else passage
    content = feedback_content(text, title, probe, question, answer, wrong_answer, instruction, example)
    body: dict[str, Any] = {"scope": scope, "content": content, "submitted_by": submitted_by or default_operator()}
    if feedback_id:
        body["feedback_id"] = feedback_id
    if wait is None:
        result = call(url, "POST", "/v1/feedback", body)
        if as_json:
            return emit_json(result)
        said = "was already submitted (this retry changes nothing)" if result.get("duplicate") else "submitted"
        console.print(Text(f"feedback {result['feedback_id']} {said} to scope {scope}"))
        console.print(f"follow it with: seal lineage --feedback {result['feedback_id']}")
        return
    try:
        result = call(url, "POST", "/v1/feedback", body)
        if not as_json:
            console.print(Text(f"feedback {result['feedback_id']} submitted to scope {scope}; waiting up to {wait:g} s for its outcome"))
        fate = wait_for_outcome(url, result["feedback_id"], wait, scope)
    except typer.Exit as exc:  # the reason is printed already
        raise typer.Exit(EXIT_FAILED) from exc
    if as_json:
        emit_json({**result, "outcome": fate})
    else:
        _print_outcome(result["feedback_id"], fate)
    state = (fate or {}).get("state")
    if state == "rejected":
        raise typer.Exit(EXIT_REJECTED)
    if state not in TERMINAL_STATES:
        raise typer.Exit(EXIT_UNDECIDED)


def wait_for_outcome(url: str, feedback_id: str, seconds: float, scope: str | None = None) -> dict[str, Any] | None:
    """The feedback's fate once it is promoted, rejected or held for approval; else the last one
    seen when ``seconds`` ran out (None: the registry had not read it yet). A registry that does
    not answer, or answers 5xx (restarting, a proxy between), is asked again until then."""
    deadline = time.monotonic() + seconds
    fate: dict[str, Any] | None = None
    while True:
        # Decided once per round, before asking: a failure on the last round is the answer (unreachable,
        # or the 5xx), never a silent "undecided" because the clock crossed the deadline in between.
        last_round = time.monotonic() + WAIT_POLL_S > deadline
        try:
            with client.client_factory(url) as http:  # looked up at the call: tests swap it
                response = http.get(
                    api_path("feedback", feedback_id), params={"scope": scope} if scope else None, headers=client.auth_headers()
                )
        except httpx.HTTPError as exc:
            if last_round:
                client.no_answer(url, exc)
            errors.print(f"[yellow]no answer from the registry ({exc}); asking again[/]")
        else:
            if response.status_code >= 500 and not last_round:
                errors.print(f"[yellow]the registry answered {response.status_code}; asking again[/]")
            elif response.status_code != 404:  # 404: not read yet
                fate = client.answer(url, response)
                if fate.get("state") in TERMINAL_STATES:
                    return fate
        if last_round:
            return fate
        time.sleep(WAIT_POLL_S)


def _print_outcome(feedback_id: str, fate: dict[str, Any] | None) -> None:
    state = (fate or {}).get("state")
    reasons = "; ".join((fate or {}).get("reasons") or [])
    if state == "promoted":
        console.print(Text(f"feedback {feedback_id}: promoted as v{fate['version']}"))  # type: ignore[index]
    elif state == "rejected":
        console.print(Text(f"feedback {feedback_id}: rejected: {reasons or 'no reason given'}"))
    elif state == "awaiting_approval":
        console.print(Text(f"feedback {feedback_id}: held for an operator's approval ({reasons})"))
    else:
        console.print(Text(f"feedback {feedback_id}: not decided yet ({state or 'not read by the registry yet'}); "
                           f"follow it with: seal lineage --feedback {feedback_id}"))
