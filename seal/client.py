"""HTTP plumbing of the ``seal`` CLI's registry commands (seal.ops, seal.submit, seal.scope_policy,
seal.dead_letters): one request to the registry's API with its token and its retries, a readable
error and an exit for an answer that is not a success, and the options, output helpers and
operator fields those commands share.

The registry is found at ``--url`` or ``SEAL_REGISTRY_URL`` (default: where ``seal up`` runs it);
a registry with API tokens takes the one in ``SEAL_API_TOKEN``. An action says who
(``--operator``, default ``SEAL_OPERATOR`` or the login name) and why (``--reason``).
"""

from __future__ import annotations

import getpass
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:18080"

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
            no_answer(url, exc)
        if response.status_code >= 500 and attempt < tries:
            errors.print(f"[yellow]the registry answered {response.status_code}; sending it again with the same request id[/]")
            time.sleep(ACTION_RETRY_S * attempt)
            continue
        return answer(url, response)
    raise AssertionError("unreachable")


def no_answer(url: str, exc: httpx.HTTPError) -> NoReturn:
    if isinstance(exc, httpx.TimeoutException):
        # The request may have arrived: an approval, a rejection or a rollback may have been applied.
        errors.print(f"[red]the registry at {url} did not answer in time[/] ({exc}); "
                     "a change may still have been applied: check before repeating it")
    else:
        errors.print(f"[red]cannot reach the registry at {url}[/] ({exc}); is it running? (--url / SEAL_REGISTRY_URL)")
    raise typer.Exit(2) from exc


def answer(url: str, response: httpx.Response) -> Any:
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


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def short(text: str | None, width: int = 16) -> str:
    return "-" if not text else (text if len(text) <= width else text[: width - 1] + "…")


def operator_body(operator: str | None, reason: str, **extra: Any) -> dict[str, Any]:
    return {"operator": operator or default_operator(), "reason": reason, "request_id": uuid.uuid4().hex, **extra}
