"""Operator commands of the ``seal`` CLI: talk to the registry's HTTP API.

    seal submit --scope acme --passage "Quellmoor got its charter in 1387." --probe "When?=1387"
    seal scopes                      seal versions --scope acme
    seal lineage --scope acme --version 3       seal lineage --feedback <id>
    seal feedback --scope acme --state awaiting_approval
    seal approve <feedback-id> --reason "scores look right"
    seal reject <feedback-id> --reason "memorized the probes"
    seal rollback --scope acme --to 2 --reason "v3 forgets the core set"
    seal pin --scope acme --reason "release freeze"     seal unpin --scope acme --reason "done"
    seal ask --scope acme "When did Quellmoor get its charter?"
    seal scope-policy get --scope acme          seal scope-policy set --scope acme approval=manual -r "release freeze"

The registry is found at ``--url`` or ``SEAL_REGISTRY_URL`` (default: where
``seal up`` runs it); a registry with API tokens takes the one in ``SEAL_API_TOKEN``.
Every listing command takes ``--json``. Actions say who
(``--operator``, default ``SEAL_OPERATOR`` or the login name) and why
(``--reason``, required); both land in the audit stream.
"""

from __future__ import annotations

import getpass
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, NoReturn, get_args
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.registry.records import (
    FEEDBACK_LIST_LIMIT,
    FEEDBACK_LIST_MAX,
    SCOPE_LIST_LIMIT,
    SCOPE_LIST_MAX,
    VERSION_LIST_LIMIT,
    VERSION_LIST_MAX,
    FeedbackState,
)

DEFAULT_URL = "http://127.0.0.1:18080"
TERMINAL_STATES = ("promoted", "rejected", "awaiting_approval")

console = Console()
errors = Console(stderr=True)

# Tests swap this for a client bound to an in-process app.
client_factory: Callable[[str], httpx.Client] = lambda url: httpx.Client(base_url=url, timeout=60.0)  # noqa: E731

UrlOption = typer.Option(
    DEFAULT_URL, "--url", envvar="SEAL_REGISTRY_URL",
    help="The registry's HTTP address (with API tokens, SEAL_API_TOKEN holds yours).",
)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")
ScopeOption = typer.Option(..., "--scope", "-s", help="The scope (product, team or user).")
ReasonOption = typer.Option(..., "--reason", "-r", help="Why: recorded in the audit stream.")


def auth_headers() -> dict[str, str]:
    """The bearer token of ``SEAL_API_TOKEN``, for a registry with API tokens (none: no header)."""
    token = os.environ.get("SEAL_API_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def default_operator() -> str:
    return os.environ.get("SEAL_OPERATOR") or getpass.getuser()


OperatorOption = typer.Option(None, "--operator", help="Who: default SEAL_OPERATOR or the login name.")
FeedbackScopeOption = typer.Option(None, "--scope", "-s", help="Its scope, where the id was sent to several.")


def _scoped(scope: str | None) -> dict[str, Any] | None:
    return {"scope": scope} if scope else None


# ------------------------------------------------------------------- plumbing


# An operator action (a body with a request id) is applied once per id: one that timed out, or met
# a registry that failed (a 5xx) or restarted, is sent again with the same id, which also publishes
# again (under the same event ids) the events of one that changed the scope and then failed.
ACTION_TRIES = 3
ACTION_RETRY_S = 2.0


def call(url: str, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
    """One request to the registry; prints a readable error and exits on failure."""
    tries = ACTION_TRIES if isinstance(body, dict) and body.get("request_id") else 1
    for attempt in range(1, tries + 1):
        try:
            with client_factory(url) as client:
                response = client.request(method, path, json=body, params=params, headers=auth_headers())
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TransportError) and attempt < tries:
                errors.print(f"[yellow]no answer from the registry ({exc}); sending it again with the same request id[/]")
                time.sleep(ACTION_RETRY_S * attempt)
                continue
            _no_answer(url, exc)
        if response.status_code >= 500 and attempt < tries:
            errors.print(f"[yellow]the registry answered {response.status_code}; sending it again with the same request id[/]")
            time.sleep(ACTION_RETRY_S * attempt)
            continue
        return _answer(url, response)
    raise AssertionError("unreachable")


def _no_answer(url: str, exc: httpx.HTTPError) -> NoReturn:
    if isinstance(exc, httpx.TimeoutException):
        # The request may have arrived: an approval, a rejection or a rollback may have been applied.
        errors.print(f"[red]the registry at {url} did not answer in time[/] ({exc}); "
                     "a change may still have been applied: check before repeating it")
    else:
        errors.print(f"[red]cannot reach the registry at {url}[/] ({exc}); is it running? (--url / SEAL_REGISTRY_URL)")
    raise typer.Exit(2) from exc


def _answer(url: str, response: httpx.Response) -> Any:
    """The registry's JSON answer, or a readable error and an exit."""
    if not response.is_success:  # redirects included: a proxy in front of the registry answers for it
        try:
            payload = response.json()
        except ValueError:
            payload = None
        detail = payload.get("detail", response.text) if isinstance(payload, dict) else response.text
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
                for d in detail
            )
        errors.print(Text.assemble((str(response.status_code), "red"), " ", str(detail)[:2000]))
        raise typer.Exit(1)
    try:
        return response.json()
    except ValueError as exc:
        errors.print(f"[red]the answer from {url} is not the registry's JSON[/] ({response.headers.get('content-type')}): "
                     f"{response.text[:200]!r}")
        raise typer.Exit(1) from exc


def api_path(*parts: object) -> str:
    """``/v1/<parts>``, each part quoted whole: an id or scope typed with ``/``, ``..`` or ``?``
    stays one path segment (``seal approve ../scopes/acme/pin`` must not become a pin)."""
    return "/v1/" + "/".join(quote(str(part), safe="") for part in parts)


def plain_row(table: Table, *cells: object) -> None:
    """A table row printed as text: what a product or an operator wrote (a passage's summary, a
    reason) is never read as rich markup ("[/note]" crashed the table)."""
    table.add_row(*(Text(str(cell)) for cell in cells))


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _short(text: str | None, width: int = 16) -> str:
    return "-" if not text else (text if len(text) <= width else text[: width - 1] + "…")


def operator_body(operator: str | None, reason: str, **extra: Any) -> dict[str, Any]:
    return {"operator": operator or default_operator(), "reason": reason, "request_id": uuid.uuid4().hex, **extra}


# ------------------------------------------------------------------- commands


def scopes(
    after: str | None = typer.Option(None, "--after", help="Start after this scope (the last one of the page before)."),
    limit: int = typer.Option(SCOPE_LIST_LIMIT, "--limit", min=1, max=SCOPE_LIST_MAX, help="Show at most this many, in name order."),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """List scopes in name order with their active version, pin and approval policy."""
    params: dict[str, Any] = {"limit": limit} | ({"after": after} if after is not None else {})
    rows = call(url, "GET", "/v1/scopes", params=params)
    if as_json:
        return emit_json(rows)
    table = Table(title="scopes")
    for col in ("scope", "active", "previous", "latest", "pinned", "approval", "open feedback"):
        table.add_column(col)
    for r in rows:
        pinned = f"yes ({r.get('pinned_by')})" if r.get("pinned") else "no"
        plain_row(table, r["scope"], _fmt(r["active_version"]), _fmt(r["previous_version"]), _fmt(r["latest_version"]), pinned, r["approval"], str(r["open_feedback"]))
    console.print(table)
    if len(rows) == limit:
        console.print(Text(f"more may follow: seal scopes --after {rows[-1]['scope']}", style="dim"))


def versions(
    scope: str = ScopeOption,
    limit: int = typer.Option(VERSION_LIST_LIMIT, "--limit", min=1, max=VERSION_LIST_MAX, help="Show the latest this many."),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """List a scope's latest versions, newest last, with their tags."""
    rows = call(url, "GET", api_path("scopes", scope, "versions"), params={"limit": limit})
    if as_json:
        return emit_json(rows)
    table = Table(title=f"versions of {scope}")
    for col in ("version", "aliases", "adapter", "parent", "reward", "target", "regression", "feedback", "approved by", "promoted at"):
        table.add_column(col)
    for r in rows:
        scores = r.get("candidate_scores") or {}
        plain_row(
            table,
            f"v{r['version']}", ",".join(r["aliases"]) or "-", _short(r["adapter_id"]), _fmt(r.get("parent_version")),
            _fmt(r.get("reward")), _fmt(scores.get("target")), _fmt(scores.get("regression")),
            _short(r["feedback_id"]), r.get("approved_by", "-"), (r.get("promoted_at") or "")[:19],
        )
    console.print(table)


def lineage(
    scope: str | None = typer.Option(None, "--scope", "-s", help="The scope of --version (or of --feedback, where its id is in several)."),
    version: int | None = typer.Option(None, "--version", "-v", help="Version -> evaluation, training, self-edit, feedback."),
    feedback: str | None = typer.Option(None, "--feedback", "-f", help="Feedback id -> what became of it."),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Lineage both ways: from a version back to its feedback, or from a feedback to its fate."""
    if feedback:
        fate = call(url, "GET", api_path("feedback", feedback), params=_scoped(scope))
        if as_json:
            return emit_json(fate)
        return print_fate(fate)
    if not (scope and version):
        raise typer.BadParameter("give --scope and --version, or --feedback")
    data = call(url, "GET", api_path("scopes", scope, "versions", version, "lineage"))
    if as_json:
        return emit_json(data)
    v, e, t, s, f = data["version"], data["evaluation"] or {}, data["training"], data["self_edit"] or {}, data["feedback"] or {}
    table = Table(title=f"{scope} v{version} ({', '.join(v['aliases']) or 'not active'})", show_header=False)
    table.add_column("what")
    table.add_column("detail")
    plain_row(table, "version", f"adapter {v['adapter_id']} on {v.get('base_model') or '?'}; parent v{_fmt(v.get('parent_version'))}; approved by {v['approved_by']}")
    plain_row(table, "  traces", f"promotion {v.get('trace_id') or '-'}; registry {v.get('registry_trace_id') or '-'}")
    if len(v.get("feedback_ids") or ()) > 1:  # a version that took in several feedback (a rebase, a policy round)
        plain_row(table, "  feedback", ", ".join(v["feedback_ids"]))
    plain_row(table, "adapter", v["adapter"]["uri"])
    plain_row(table, "evaluation", f"reward {_fmt(e.get('reward'))}, passed {e.get('passed')}, attempt {e.get('attempt')}; event {e.get('event_id')}; trace {e.get('trace_id')}")
    for gate in e.get("gates", []):
        plain_row(table, f"  gate {gate['gate']}", f"{'pass' if gate['passed'] else 'FAIL'} value {_fmt(gate.get('value'))} threshold {_fmt(gate.get('threshold'))} {gate.get('reason', '')}")
    run = t.get("run") or {}
    plain_row(table, "training run", f"loss {_fmt(run.get('final_loss'))}, {_fmt(run.get('seconds'), 1)}s; event {run.get('event_id', '-')}; trace {run.get('trace_id', '-')}")
    plain_row(table, "self-edit", f"{s.get('self_edit_id', '-')} ({s.get('format', '?')}, {len(s.get('sequences', []))} sequences); event {s.get('event_id', '-')}")
    plain_row(table, "feedback", f"{f.get('feedback_id')} by {f.get('submitted_by')} at {f.get('submitted_at')}; trace {f.get('trace_id')}")
    plain_row(table, "  content", f.get("summary") or "-")
    plain_row(table, "ancestors", " <- ".join(f"v{a['version']} (feedback {a.get('feedback_id') or '?'})" for a in data["ancestors"]) or "-")
    console.print(table)


def print_fate(fate: dict[str, Any]) -> None:
    title = f"feedback {fate['feedback_id']} in {fate['scope']}: {fate['state']}"
    if fate.get("version"):
        title += f" as v{fate['version']}"
    caption = "; ".join(fate.get("reasons") or [])
    table = Table(title=Text(title), caption=Text(caption) if caption else None)
    for col in ("candidate", "result", "verdict", "attempt", "reward", "adapter", "reasons"):
        table.add_column(col)
    for c in fate["candidates"]:
        plain_row(
            table,
            str(c["index"]), c["result"], c.get("verdict") or "-", str(c["attempt"]), _fmt(c.get("reward")),
            _short(c.get("adapter_id")), "; ".join(c.get("reasons") or []),
        )
    console.print(table)


def feedback_list(
    scope: str = ScopeOption,
    state: str | None = typer.Option(None, "--state", help=f"one of: {', '.join(get_args(FeedbackState))}"),
    limit: int = typer.Option(FEEDBACK_LIST_LIMIT, "--limit", min=1, max=FEEDBACK_LIST_MAX, help="Show the latest this many."),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """List a scope's latest feedback and what state each is in."""
    params: dict[str, str | int] = {"limit": limit}
    if state:
        params["state"] = state
    rows = call(url, "GET", api_path("scopes", scope, "feedback"), params=params)
    if as_json:
        return emit_json(rows)
    table = Table(title=f"feedback of {scope}")
    for col in ("feedback", "state", "version", "submitted by", "submitted at", "summary"):
        table.add_column(col)
    for r in rows:
        plain_row(table, r["feedback_id"], r["state"], _fmt(r.get("version")), r.get("submitted_by") or "-", (r.get("submitted_at") or "")[:19], _short(r.get("summary"), 60))
    console.print(table)


def approve(
    feedback_id: str = typer.Argument(..., help="The feedback whose held candidate to promote."),
    reason: str = ReasonOption,
    operator: str | None = OperatorOption,
    scope: str | None = FeedbackScopeOption,
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Approve a held candidate: it becomes the scope's next version (or is rebased first)."""
    fate = call(url, "POST", api_path("feedback", feedback_id, "approve"), operator_body(operator, reason), _scoped(scope))
    emit_json(fate) if as_json else print_fate(fate)


def reject(
    feedback_id: str = typer.Argument(..., help="The feedback to reject (held or still in flight)."),
    reason: str = ReasonOption,
    operator: str | None = OperatorOption,
    scope: str | None = FeedbackScopeOption,
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Reject a feedback's candidates."""
    fate = call(url, "POST", api_path("feedback", feedback_id, "reject"), operator_body(operator, reason), _scoped(scope))
    emit_json(fate) if as_json else print_fate(fate)


def _print_head(result: dict[str, Any], verb: str) -> None:
    console.print(
        f"{result['scope']}: {verb}; active v{result['active_version']}, previous v{_fmt(result['previous_version'])}, "
        f"latest v{result['latest_version']}{', pinned by ' + str(result['pinned_by']) if result['pinned'] else ''}",
        markup=False,
    )


def rollback(
    scope: str = ScopeOption,
    to: int = typer.Option(..., "--to", help="The version to make active again."),
    reason: str = ReasonOption,
    operator: str | None = OperatorOption,
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Roll a scope back to an earlier version."""
    result = call(url, "POST", api_path("scopes", scope, "rollback"), operator_body(operator, reason, to_version=to))
    emit_json(result) if as_json else _print_head(result, f"rolled back to v{to}")


def pin(
    scope: str = ScopeOption,
    reason: str = ReasonOption,
    operator: str | None = OperatorOption,
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Pin a scope's active version: promotions are held for approval until unpinned."""
    result = call(url, "POST", api_path("scopes", scope, "pin"), operator_body(operator, reason))
    emit_json(result) if as_json else _print_head(result, "pinned")


def unpin(
    scope: str = ScopeOption,
    reason: str = ReasonOption,
    operator: str | None = OperatorOption,
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Unpin a scope; what was held only by the pin is decided again."""
    result = call(url, "POST", api_path("scopes", scope, "unpin"), operator_body(operator, reason))
    emit_json(result) if as_json else _print_head(result, "unpinned")


def ask(
    question: str = typer.Argument(..., help="The question."),
    scope: str = ScopeOption,
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Longest answer, in tokens (default: the registry's)."),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Ask the scope's active model (base model + active adapter) a question."""
    body: dict[str, Any] = {"question": question}
    if max_new_tokens:
        body["max_new_tokens"] = max_new_tokens
    result = call(url, "POST", api_path("scopes", scope, "ask"), body)
    if as_json:
        return emit_json(result)
    which = f"v{result['version']}" if result.get("version") else "base model"
    console.print(Text.assemble((f"{scope} ({which}, {result.get('base_model')}):", "dim"), " ", result["answer"] or "(no answer)"))


COMMANDS: dict[str, Callable[..., None]] = {
    "scopes": scopes,
    "versions": versions,
    "lineage": lineage,
    "feedback": feedback_list,
    "approve": approve,
    "reject": reject,
    "rollback": rollback,
    "pin": pin,
    "unpin": unpin,
    "ask": ask,
}


def register(app: typer.Typer) -> None:
    """Add the operator commands to a typer app (the top-level ``seal``)."""
    from seal.scope_policy import policy_app
    from seal.submit import submit

    app.command("submit")(submit)
    for name, command in COMMANDS.items():
        app.command(name)(command)
    app.add_typer(policy_app, name="scope-policy")

