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
(``--reason``, required); both land in the audit stream. The HTTP plumbing and the options
these commands share are in seal.client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import typer
from rich.table import Table
from rich.text import Text

from seal.client import (
    FeedbackScopeOption,
    JsonOption,
    OperatorOption,
    ReasonOption,
    ScopeOption,
    UrlOption,
    api_path,
    call,
    console,
    emit_json,
    fmt,
    operator_body,
    plain_row,
    short,
)
from services.registry.records import (
    FEEDBACK_LIST_LIMIT,
    FEEDBACK_LIST_MAX,
    SCOPE_LIST_LIMIT,
    SCOPE_LIST_MAX,
    VERSION_LIST_LIMIT,
    VERSION_LIST_MAX,
    FeedbackState,
)


def _scoped(scope: str | None) -> dict[str, Any] | None:
    return {"scope": scope} if scope else None


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
        plain_row(table, r["scope"], fmt(r["active_version"]), fmt(r["previous_version"]), fmt(r["latest_version"]), pinned, r["approval"], str(r["open_feedback"]))
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
            f"v{r['version']}", ",".join(r["aliases"]) or "-", short(r["adapter_id"]), fmt(r.get("parent_version")),
            fmt(r.get("reward")), fmt(scores.get("target")), fmt(scores.get("regression")),
            short(r["feedback_id"]), r.get("approved_by", "-"), (r.get("promoted_at") or "")[:19],
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
    plain_row(table, "version", f"adapter {v['adapter_id']} on {v.get('base_model') or '?'}; parent v{fmt(v.get('parent_version'))}; approved by {v['approved_by']}")
    plain_row(table, "  traces", f"promotion {v.get('trace_id') or '-'}; registry {v.get('registry_trace_id') or '-'}")
    if len(v.get("feedback_ids") or ()) > 1:  # a version that took in several feedback (a rebase, a policy round)
        plain_row(table, "  feedback", ", ".join(v["feedback_ids"]))
    plain_row(table, "adapter", v["adapter"]["uri"])
    plain_row(table, "evaluation", f"reward {fmt(e.get('reward'))}, passed {e.get('passed')}, attempt {e.get('attempt')}; event {e.get('event_id')}; trace {e.get('trace_id')}")
    for gate in e.get("gates", []):
        plain_row(table, f"  gate {gate['gate']}", f"{'pass' if gate['passed'] else 'FAIL'} value {fmt(gate.get('value'))} threshold {fmt(gate.get('threshold'))} {gate.get('reason', '')}")
    run = t.get("run") or {}
    plain_row(table, "training run", f"loss {fmt(run.get('final_loss'))}, {fmt(run.get('seconds'), 1)}s; event {run.get('event_id', '-')}; trace {run.get('trace_id', '-')}")
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
            str(c["index"]), c["result"], c.get("verdict") or "-", str(c["attempt"]), fmt(c.get("reward")),
            short(c.get("adapter_id")), "; ".join(c.get("reasons") or []),
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
        plain_row(table, r["feedback_id"], r["state"], fmt(r.get("version")), r.get("submitted_by") or "-", (r.get("submitted_at") or "")[:19], short(r.get("summary"), 60))
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
        f"{result['scope']}: {verb}; active v{result['active_version']}, previous v{fmt(result['previous_version'])}, "
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

