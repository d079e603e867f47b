"""Bearer tokens of the registry's HTTP API.

With ``registry.api_tokens`` set, every route but the health checks and the API's own docs needs
``Authorization: Bearer <token>``, and the token's role must reach the route's: 401 without a
known token, 403 with one whose role falls short. An operator action is recorded in the audit
stream under the name the caller gives and the token's name, so a shared login cannot hide who
held the key. With no tokens the API is open, as on the embedded local stack; the registry says
so at start when it listens beyond this machine.

The NATS request-reply operations (``rpc.py``) are guarded by NATS's own authorization: grant
publish on ``seal.rpc.registry.>`` only to the users that may act.
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


def requires(tokens: Tokens, role: ApiRole, action: str) -> Callable[..., Awaitable[Principal | None]]:
    """A FastAPI dependency: the request's principal when its token may ``action`` (None when the
    API is open), else a 401 or 403 that says what is missing."""

    async def check(request: Request) -> Principal | None:
        if not tokens.enabled:
            return None
        credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
        if credentials is None:
            raise HTTPException(
                401,
                f"to {action} the registry needs an API token with the {role} role at least: "
                "send Authorization: Bearer <token> (the seal CLI sends SEAL_API_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = tokens.principal(credentials.credentials)
        if principal is None:
            log.warning("refused %s %s: an unknown API token", request.method, request.url.path)
            raise HTTPException(401, "the API token is not one of this registry's tokens (registry.api_tokens)",
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if not principal.may(role):
            log.warning("refused %s %s to token %s (%s)", request.method, request.url.path, principal.name, principal.role)
            raise HTTPException(403, f"the token {principal.name!r} has the {principal.role} role; "
                                     f"to {action} needs the {role} role")
        return principal

    return check


def attributed(operator: str, principal: Principal | None) -> str:
    """The operator name for the audit stream: the caller's, with the token that vouched for it."""
    if principal is None or operator == principal.name:
        return operator
    suffix = f" (token {principal.name})"
    return operator[: SHORT_TEXT_MAX - len(suffix)] + suffix
