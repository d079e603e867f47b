"""``seal scope-policy``: read or change a scope's policy through the registry's HTTP API.

    seal scope-policy get --scope acme
    seal scope-policy set --scope acme approval=manual candidates=4 policy_round_examples=16 -r "more candidates"
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from seal.client import (
    JsonOption,
    OperatorOption,
    ReasonOption,
    ScopeOption,
    UrlOption,
    api_path,
    call,
    console,
    default_operator,
    emit_json,
    plain_row,
)

policy_app = typer.Typer(help="Read or change a scope's policy (candidates, gates, approval, timeout).", no_args_is_help=True)


@policy_app.command("get")
def policy_get(scope: str = ScopeOption, url: str = UrlOption, as_json: bool = JsonOption) -> None:
    """Show a scope's policy (defaults for a scope never configured)."""
    policy = call(url, "GET", api_path("scopes", scope, "policy"))
    if as_json:
        return emit_json(policy)
    print_policy(scope, policy)


def print_policy(scope: str, policy: dict[str, Any]) -> None:
    table = Table(title=f"policy of {scope}")
    table.add_column("setting")
    table.add_column("value")
    for key, value in policy.items():
        plain_row(table, key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs as a dict; a value is read as JSON where it is JSON, else kept as text."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"want key=value, got {item!r}")
        try:
            parsed[key.strip()] = json.loads(raw)
        except ValueError:
            parsed[key.strip()] = raw
    return parsed


@policy_app.command("set")
def policy_set(
    changes: list[str] | None = typer.Argument(None, help="key=value pairs, e.g. approval=manual candidates=4 min_gain=0.02"),
    scope: str = ScopeOption,
    reason: str = ReasonOption,
    replace: bool = typer.Option(
        False, "--replace", help="Start from the defaults, not the stored policy (repairs one that no longer parses)."
    ),
    operator: str | None = OperatorOption,
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Change some of a scope's policy settings; the rest keep their values (with --replace: their
    defaults). Audited: who, why, what."""
    if not changes and not replace:
        raise typer.BadParameter("give the settings to change as key=value pairs (or --replace: all defaults)")
    try:
        parsed = parse_settings(changes or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    who = {"operator": operator or default_operator(), "reason": reason} | ({"replace": "true"} if replace else {})
    policy = call(url, "PATCH", api_path("scopes", scope, "policy"), parsed, params=who)
    emit_json(policy) if as_json else print_policy(scope, policy)
