"""The registry's HTTP API (FastAPI): queries, operator actions, health.

OpenAPI docs are served at ``/docs``. Errors come back as
``{"detail": "..."}`` with 401/403 (no token, or one whose role falls short: ``auth.py``), 404
(unknown scope, version or feedback), 409 (an action that does not apply now), 422 (invalid
input) or 503.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from shared.events import ID_PATTERN, SCOPE_PATTERN, describe_validation_error
from shared.registry_view import ConflictError, UnreadableRecord
from shared.store import AdapterNotFound, IntegrityError

from .auth import Principal, Tokens, attributed, requires
from .operations import (
    AskRequest,
    Operations,
    OperatorRequest,
    ReplayRequest,
    RollbackRequest,
    SubmitFeedback,
    Unavailable,
)
from .ports import InvalidRequest, NotFound, Refused
from .records import (
    FEEDBACK_LIST_LIMIT,
    FEEDBACK_LIST_MAX,
    SCOPE_LIST_LIMIT,
    SCOPE_LIST_MAX,
    VERSION_LIST_LIMIT,
    VERSION_LIST_MAX,
    FeedbackState,
)
from .redrive import DEAD_LETTER_LIST_LIMIT, DEAD_LETTER_LIST_MAX, MAX_SEQUENCE, SERVICE_PATTERN

Action = TypeVar("Action", bound=OperatorRequest)
ScopePath = Annotated[str, Path(pattern=SCOPE_PATTERN)]
FeedbackPath = Annotated[str, Path(pattern=ID_PATTERN)]
# Where a product broke the feedback ids' uniqueness: which scope's feedback is meant.
ScopeQuery = Annotated[str | None, Query(pattern=SCOPE_PATTERN)]

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    def handler(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def respond(request: Request, exc: Exception) -> JSONResponse:
            detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            return JSONResponse({"detail": detail}, status_code=status)

        return respond

    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(Refused, handler(409))
    app.add_exception_handler(ConflictError, handler(409))
    app.add_exception_handler(ValidationError, handler(422))
    app.add_exception_handler(InvalidRequest, handler(422))
    app.add_exception_handler(Unavailable, handler(503))
    app.add_exception_handler(AdapterNotFound, handler(404))
    app.add_exception_handler(IntegrityError, handler(409))
    # A stored record that does not parse: the server's fault, but said in words (not "Internal Server Error").
    app.add_exception_handler(UnreadableRecord, handler(500))


def health_router(trouble: Callable[[], Awaitable[str | None]], ready: Callable[[], Awaitable[bool]]) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> PlainTextResponse:
        """Liveness: 200, or 503 with why only a restart mends it (said in the log as well)."""
        if (why := await trouble()) is None:
            return PlainTextResponse("ok")
        log.warning("not alive: %s", why)
        return PlainTextResponse(why[:500], status_code=503)

    @router.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> PlainTextResponse:
        ok = await ready()
        return PlainTextResponse("ready" if ok else "not ready", status_code=200 if ok else 503)

    return router


def registry_router(ops: Operations, tokens: Tokens) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["registry"])
    read = [Depends(requires(tokens, "reader", "read the registry"))]
    producer = Depends(requires(tokens, "producer", "send feedback or ask"))
    acting = Depends(requires(tokens, "operator", "act on the registry"))

    def vouched(body: Action, who: Principal | None) -> Action:
        return body.model_copy(update={"operator": attributed(body.operator, who)}) if who else body

    @router.get("/scopes", dependencies=read)
    async def scopes(
        after: Annotated[str | None, Query(pattern=SCOPE_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=SCOPE_LIST_MAX)] = SCOPE_LIST_LIMIT,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` scopes in name order; ``after`` the last scope of a page gives the next."""
        return await ops.scopes(after, limit)

    @router.get("/scopes/{scope}/versions", dependencies=read)
    async def versions(
        scope: ScopePath, limit: Annotated[int, Query(ge=1, le=VERSION_LIST_MAX)] = VERSION_LIST_LIMIT
    ) -> list[dict[str, Any]]:
        """The scope's latest ``limit`` versions, oldest first."""
        return await ops.versions(scope, limit)

    @router.get("/scopes/{scope}/versions/{version}/lineage", dependencies=read)
    async def lineage(scope: ScopePath, version: Annotated[int, Path(ge=1)]) -> dict[str, Any]:
        return await ops.lineage(scope, version)

    @router.get("/scopes/{scope}/feedback", dependencies=read)
    async def feedback_list(
        scope: ScopePath,
        state: Annotated[FeedbackState | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=FEEDBACK_LIST_MAX)] = FEEDBACK_LIST_LIMIT,
    ) -> list[dict[str, Any]]:
        """The latest ``limit`` feedback of the scope (in ``state``), oldest first."""
        return await ops.feedback_list(scope, state, limit)

    @router.get("/feedback/{feedback_id}", dependencies=read)
    async def feedback(feedback_id: FeedbackPath, scope: ScopeQuery = None) -> dict[str, Any]:
        return await ops.feedback(feedback_id, scope)

    @router.post("/feedback", status_code=202)
    async def submit(body: SubmitFeedback, who: Principal | None = producer) -> dict[str, Any]:
        if who is not None:  # lineage names the token that sent it beside whoever the body says
            body = body.model_copy(update={"submitted_by": attributed(body.submitted_by or who.name, who)})
        return await ops.submit(body)

    @router.post("/feedback/{feedback_id}/approve")
    async def approve(
        feedback_id: FeedbackPath, body: OperatorRequest, scope: ScopeQuery = None, who: Principal | None = acting
    ) -> dict[str, Any]:
        return await ops.approve(feedback_id, vouched(body, who), scope)

    @router.post("/feedback/{feedback_id}/reject")
    async def reject(
        feedback_id: FeedbackPath, body: OperatorRequest, scope: ScopeQuery = None, who: Principal | None = acting
    ) -> dict[str, Any]:
        return await ops.reject(feedback_id, vouched(body, who), scope)

    @router.post("/scopes/{scope}/rollback")
    async def rollback(scope: ScopePath, body: RollbackRequest, who: Principal | None = acting) -> dict[str, Any]:
        return await ops.rollback(scope, vouched(body, who))

    @router.post("/scopes/{scope}/pin")
    async def pin(scope: ScopePath, body: OperatorRequest, who: Principal | None = acting) -> dict[str, Any]:
        return await ops.pin(scope, vouched(body, who), pinned=True)

    @router.post("/scopes/{scope}/unpin")
    async def unpin(scope: ScopePath, body: OperatorRequest, who: Principal | None = acting) -> dict[str, Any]:
        return await ops.pin(scope, vouched(body, who), pinned=False)

    @router.get("/scopes/{scope}/policy", dependencies=read)
    async def get_policy(scope: ScopePath) -> dict[str, Any]:
        return await ops.get_policy(scope)

    @router.patch("/scopes/{scope}/policy")
    async def set_policy(
        scope: ScopePath,
        changes: Annotated[dict[str, Any], Body()],
        operator: Annotated[str, Query(min_length=1, max_length=200)],
        reason: Annotated[str, Query(min_length=1, max_length=1000)],
        replace: bool = False,
        who: Principal | None = acting,
    ) -> dict[str, Any]:
        """The changed settings as the body; who and why (``?operator=&reason=``, both required: a
        policy decides what is promoted) go to the audit stream. ``?replace=true``: the defaults
        with these changes, over whatever is stored."""
        return await ops.set_policy(scope, changes, attributed(operator, who), reason, replace)

    @router.post("/scopes/{scope}/ask")
    async def ask(scope: ScopePath, body: AskRequest, _: Principal | None = producer) -> dict[str, Any]:
        return await ops.ask(scope, body)

    # Operators only: dead letters hold whole events, feedback content included.
    @router.get("/dead-letters", dependencies=[acting])
    async def dead_letters(
        service: Annotated[str | None, Query(pattern=SERVICE_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=DEAD_LETTER_LIST_MAX)] = DEAD_LETTER_LIST_LIMIT,
    ) -> list[dict[str, Any]]:
        return await ops.dead_letter_list(service, limit)

    @router.post("/dead-letters/{sequence}/replay")
    async def replay(
        sequence: Annotated[int, Path(ge=1, le=MAX_SEQUENCE)], body: ReplayRequest, who: Principal | None = acting
    ) -> dict[str, Any]:
        return await ops.dead_letter_replay(sequence, vouched(body, who))

    return router


# The largest request body read: the body is read (and parsed) before a route's token is checked, so
# without a bound anyone who can reach the API could hold gigabytes in the registry's memory. A
# feedback must fit a NATS message (1 MiB) as an event; JSON escapes can make the body larger.
MAX_BODY_BYTES = 4 * 2**20


def build_api(
    ops: Operations,
    trouble: Callable[[], Awaitable[str | None]],
    ready: Callable[[], Awaitable[bool]],
    lifespan: Any = None,
    tokens: Tokens | None = None,
) -> FastAPI:
    app = FastAPI(
        title="SEAL registry",
        description="Adapter versions, decisions and lineage of the SEAL platform.",
        version="1",
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
    )
    install_error_handlers(app)
    app.include_router(health_router(trouble, ready))
    app.include_router(registry_router(ops, tokens or Tokens()))
    return app
