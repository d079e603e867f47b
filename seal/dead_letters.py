"""Dead-letter commands of the ``seal`` CLI, through the registry's HTTP API.

    seal dead-letters                       the newest messages given up on, and why
    seal dead-letters --service trainer     one service's
    seal replay 42 --reason "S3 is back"    publish dead letter 42 to its subject again
                                            (refused once its feedback is decided, unless --force)
"""

from __future__ import annotations

import typer
from rich.table import Table

from seal.client import (
    JsonOption,
    OperatorOption,
    ReasonOption,
    UrlOption,
    api_path,
    call,
    console,
    emit_json,
    operator_body,
    plain_row,
    short,
)
from services.registry.redrive import DEAD_LETTER_LIST_LIMIT, DEAD_LETTER_LIST_MAX


def dead_letters(
    service: str | None = typer.Option(None, "--service", help="Only this service's: generator, trainer, evaluator or registry."),
    limit: int = typer.Option(DEAD_LETTER_LIST_LIMIT, "--limit", min=1, max=DEAD_LETTER_LIST_MAX, help="Show the latest this many."),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """List the newest dead letters: what a service gave up on, and why."""
    rows = call(url, "GET", "/v1/dead-letters", params={"limit": limit, **({"service": service} if service else {})})
    if as_json:
        return emit_json(rows)
    table = Table(title="dead letters, newest first")
    for col in ("seq", "at", "service", "event", "scope", "feedback", "feedback state", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        # Reasons quote what a product sent: printed as text, never read as rich markup.
        plain_row(table, r["sequence"], (r.get("at") or "")[:19], r["service"], r.get("event_type") or r["subject"],
                  r.get("scope") or "-", short(r.get("feedback_id")), r.get("feedback_state") or "-", r["reason"][:300])
    console.print(table if rows else "no dead letters")


def replay(
    sequence: int = typer.Argument(..., min=1, help="The dead letter's sequence number (seal dead-letters)."),
    reason: str = ReasonOption,
    operator: str | None = OperatorOption,
    force: bool = typer.Option(
        False, "--force", help="Replay a step of a feedback that is decided already (its outcome is not considered)."
    ),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Publish a dead letter's event to its subject again, once its cause is fixed; it leaves the dead letters."""
    body = operator_body(operator, reason, **({"force": True} if force else {}))
    result = call(url, "POST", api_path("dead-letters", sequence, "replay"), body)
    if as_json:
        return emit_json(result)
    console.print(f"replayed dead letter {sequence} ({result.get('event_type')}, feedback {result.get('feedback_id')}) "
                  f"to {result['replayed_to']}")


def register(app: typer.Typer) -> None:
    app.command("dead-letters")(dead_letters)
    app.command("replay")(replay)
