"""Bearer tokens of the registry's HTTP API.

With ``registry.api_tokens`` set, every route but the health checks and the API's own docs needs
``Authorization: Bearer <token>``, and the token's role must reach the route's: 401 without a
known token, 403 with one whose role falls short. An operator action is recorded in the audit
stream under the name the caller gives and the token's name, so a shared login cannot hide who
held the key. With no tokens the API is open, as on the embedded local stack; the registry says
so at start when it listens beyond this machine.

The NATS request-reply operations (``rpc.py``) take the same tokens, in the request's
``Authorization`` header, with the same roles: a product that holds the NATS password to publish
feedback can no more approve over the bus than over HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.contracts import SHORT_TEXT_MAX

from .settings import API_ROLES, ApiRole, ApiToken

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="An API token of the registry (registry.api_tokens).")


@dataclass(frozen=True)
class Principal:
    """Who a request's token says it is."""

    name: str
    role: ApiRole

    def may(self, role: ApiRole) -> bool:
        return API_ROLES.index(self.role) >= API_ROLES.index(role)


def _digest(secret: str) -> bytes:
    # Compared as digests of one length: the comparison's time says nothing of a token's length.
    return hashlib.sha256(secret.encode()).digest()


class Tokens:
    """The configured tokens; an empty set leaves the API open."""

    def __init__(self, tokens: Sequence[ApiToken] = ()) -> None:
        self._known = [(_digest(t.token.get_secret_value()), Principal(t.name, t.role)) for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._known)

    def principal(self, presented: str) -> Principal | None:
        digest = _digest(presented)
        found = None
        for known, principal in self._known:  # every one compared: the time does not say which matched
            if hmac.compare_digest(known, digest):
                found = principal
        return found


class Unauthorized(Exception):
    """A request without a known token (401), or with one whose role falls short (403)."""

    def __init__(self, status: int, detail: str, challenge: str = "Bearer") -> None:
        super().__init__(detail)
        self.status, self.detail, self.challenge = status, detail, challenge


def authorize(tokens: Tokens, presented: str | None, role: ApiRole, action: str, where: str) -> Principal | None:
    """Who ``presented`` (a bearer token, or None) is, when it may ``action``; None when the API is
    open. ``where`` names the request in the log line of a refusal."""
    if not tokens.enabled:
        return None
    if not presented:
        raise Unauthorized(401, f"to {action} the registry needs an API token with the {role} role at least: "
                                "send Authorization: Bearer <token> (the seal CLI sends SEAL_API_TOKEN)")
    principal = tokens.principal(presented)
    if principal is None:
        log.warning("refused %s: an unknown API token", where)
        raise Unauthorized(401, "the API token is not one of this registry's tokens (registry.api_tokens)",
                           'Bearer error="invalid_token"')
    if not principal.may(role):
        log.warning("refused %s to token %s (%s)", where, principal.name, principal.role)
        raise Unauthorized(403, f"the token {principal.name!r} has the {principal.role} role; to {action} needs the {role} role")
    return principal


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def requires(tokens: Tokens, role: ApiRole, action: str) -> Callable[..., Awaitable[Principal | None]]:
    """A FastAPI dependency: the request's principal when its token may ``action`` (None when the
    API is open), else a 401 or 403 that says what is missing."""

    async def check(request: Request) -> Principal | None:
        credentials: HTTPAuthorizationCredentials | None = await _bearer(request) if tokens.enabled else None
        try:
            return authorize(tokens, credentials.credentials if credentials else None, role, action,
                             f"{request.method} {request.url.path}")
        except Unauthorized as exc:
            headers = {"WWW-Authenticate": exc.challenge} if exc.status == 401 else None
            raise HTTPException(exc.status, exc.detail, headers=headers) from None

    return check


def attributed(operator: str, principal: Principal | None) -> str:
    """The operator name for the audit stream: the caller's, with the token that vouched for it."""
    if principal is None or operator == principal.name:
        return operator
    suffix = f" (token {principal.name})"
    return operator[: SHORT_TEXT_MAX - len(suffix)] + suffix
