"""NATS request-reply for other services: ``seal.rpc.registry.<operation>``.

Request: a JSON object of arguments; where the registry has API tokens, the header
``Authorization: Bearer <token>`` with the operation's role (``ROLES``, as over HTTP). Reply:
``{"ok": true, "result": ...}`` or ``{"ok": false, "status": 401|403|404|409|413|422|500|503,
"error": "..."}``. Every replica answers in the queue group ``registry``, so one request gets one
answer.

Operations: ``scopes`` {after?, limit?}; ``versions`` {scope}; ``lineage`` {scope, version};
``feedback`` {feedback_id, scope?}; ``feedback_list`` {scope, state?, limit?}; ``submit``
{scope, content, submitted_by?, feedback_id?}; ``approve`` / ``reject``
{feedback_id, operator, reason, scope?}; ``rollback`` {scope, to_version, operator,
reason, request_id?}; ``pin`` / ``unpin`` {scope, operator, reason, request_id?};
``policy_get`` {scope}; ``policy_set`` {scope, changes, operator, reason, replace?}; ``ask`` {scope,
question, max_new_tokens?}; ``dead_letters`` {service?, limit?};
``dead_letter_replay`` {sequence, operator, reason, request_id?, force?}. A request with its
``request_id`` again is applied once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, get_args

from faststream.nats import NatsBroker, NatsMessage
from pydantic import ValidationError

from shared.events import ID_PATTERN, SCOPE_PATTERN, describe_validation_error, new_id
from shared.registry_view import ConflictError
from shared.store import AdapterNotFound, IntegrityError
from shared.subjects import REGISTRY_RPC

from .auth import Principal, Tokens, Unauthorized, attributed, authorize, bearer_token
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
from .settings import ApiRole

log = logging.getLogger(__name__)

QUEUE = "registry"
# What a reply may hold: below nats-server's default max_payload (1 MiB), with room for the envelope.
RPC_MAX_ANSWER_BYTES = 1_000_000


def _scope(args: dict[str, Any]) -> str:
    return _matching(args, "scope", SCOPE_PATTERN)


def _optional(args: dict[str, Any], name: str, pattern: str) -> str | None:
    """An argument that may be left out (or null), else as :func:`_matching` takes it."""
    return _matching(args, name, pattern) if args.get(name) is not None else None


def _id(args: dict[str, Any], name: str) -> str:
    return _matching(args, name, ID_PATTERN)


def _matching(args: dict[str, Any], name: str, pattern: str) -> str:
    """The argument as the HTTP API's path would take it: a wildcard or a subject token never reaches a KV key."""
    value = args[name]
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise InvalidRequest(f"{name} must be a string matching {pattern}, not {value!r}"[:300])
    return value


def _int(args: dict[str, Any], name: str) -> int:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest(f"{name} must be an integer, not {value!r}"[:200])
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, not {value!r}"[:200]) from None


def _state(args: dict[str, Any]) -> str | None:
    """An optional feedback state, one of those the HTTP API's ``state`` takes."""
    state = args.get("state")
    if state is not None and state not in get_args(FeedbackState):
        raise InvalidRequest(f"state must be one of {', '.join(get_args(FeedbackState))}, not {state!r}"[:300])
    return state


def _limit(args: dict[str, Any], default: int, most: int) -> int:
    limit = _int(args, "limit") if args.get("limit") is not None else default
    if not 1 <= limit <= most:
        raise InvalidRequest(f"limit must be from 1 to {most}, not {limit}")
    return limit


def _changes(args: dict[str, Any]) -> dict[str, Any]:
    changes = args.get("changes") or {}
    if not isinstance(changes, dict):
        raise InvalidRequest(f"changes must be an object of policy settings, not {changes!r}"[:200])
    return dict(changes)


def _sequence(args: dict[str, Any]) -> int:
    sequence = _int(args, "sequence")
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise InvalidRequest(f"sequence must be from 1 to {MAX_SEQUENCE}, not {sequence}")
    return sequence


def _text(args: dict[str, Any], name: str) -> str:
    value = args[name]  # KeyError: "missing argument"
    if not isinstance(value, str) or not value.strip() or len(value) > 1000:
        raise InvalidRequest(f"{name} must be a string of 1 to 1000 characters, not {value!r}"[:200])
    return value


def _flag(args: dict[str, Any], name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, not {value!r}"[:200])
    return value


def _without(args: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in names}


def operations_table(ops: Operations) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
    return {
        "scopes": lambda a: ops.scopes(
            _optional(a, "after", SCOPE_PATTERN),
            _limit(a, SCOPE_LIST_LIMIT, SCOPE_LIST_MAX),
        ),
        "versions": lambda a: ops.versions(_scope(a), _limit(a, VERSION_LIST_LIMIT, VERSION_LIST_MAX)),
        "lineage": lambda a: ops.lineage(_scope(a), _int(a, "version")),
        "feedback": lambda a: ops.feedback(_id(a, "feedback_id"), _optional(a, "scope", SCOPE_PATTERN)),
        "feedback_list": lambda a: ops.feedback_list(_scope(a), _state(a), _limit(a, FEEDBACK_LIST_LIMIT, FEEDBACK_LIST_MAX)),
        "submit": lambda a: ops.submit(SubmitFeedback.model_validate(a)),
        "approve": lambda a: ops.approve(
            _id(a, "feedback_id"), OperatorRequest.model_validate(_without(a, "feedback_id", "scope")), _optional(a, "scope", SCOPE_PATTERN)
        ),
        "reject": lambda a: ops.reject(
            _id(a, "feedback_id"), OperatorRequest.model_validate(_without(a, "feedback_id", "scope")), _optional(a, "scope", SCOPE_PATTERN)
        ),
        "rollback": lambda a: ops.rollback(_scope(a), RollbackRequest.model_validate(_without(a, "scope"))),
        "pin": lambda a: ops.pin(_scope(a), OperatorRequest.model_validate(_without(a, "scope")), pinned=True),
        "unpin": lambda a: ops.pin(_scope(a), OperatorRequest.model_validate(_without(a, "scope")), pinned=False),
        "policy_get": lambda a: ops.get_policy(_scope(a)),
        "policy_set": lambda a: ops.set_policy(
            _scope(a), _changes(a), _text(a, "operator"), _text(a, "reason"), _flag(a, "replace")
        ),
        "ask": lambda a: ops.ask(_scope(a), AskRequest.model_validate(_without(a, "scope"))),
        "dead_letters": lambda a: ops.dead_letter_list(
            _optional(a, "service", SERVICE_PATTERN),
            _limit(a, DEAD_LETTER_LIST_LIMIT, DEAD_LETTER_LIST_MAX),
        ),
        "dead_letter_replay": lambda a: ops.dead_letter_replay(
            _sequence(a), ReplayRequest.model_validate(_without(a, "sequence"))
        ),
    }


async def answer(call: Callable[[dict[str, Any]], Awaitable[Any]], args: Any, name: str = "?") -> dict[str, Any]:
    if not isinstance(args, dict):
        return {"ok": False, "status": 422, "error": "the request must be a JSON object of arguments"}
    try:
        result = await call(args)
        size = len(json.dumps(result, default=str))
        if size > RPC_MAX_ANSWER_BYTES:
            # Sent as it is, it would exceed the server's message size, and the caller would only time out.
            return {"ok": False, "status": 413, "error": f"the answer ({size} bytes) is larger than a NATS message "
                    f"allows ({RPC_MAX_ANSWER_BYTES}); ask for less (a smaller limit)"}
        return {"ok": True, "result": result}
    except (NotFound, AdapterNotFound) as exc:  # as over HTTP: an active version whose adapter is gone
        return {"ok": False, "status": 404, "error": str(exc)}
    except (Refused, ConflictError, IntegrityError) as exc:
        return {"ok": False, "status": 409, "error": str(exc)}
    except ValidationError as exc:
        return {"ok": False, "status": 422, "error": describe_validation_error(exc)}
    except InvalidRequest as exc:
        return {"ok": False, "status": 422, "error": str(exc)}
    except KeyError as exc:
        return {"ok": False, "status": 422, "error": f"missing argument {exc}"}
    except Unavailable as exc:
        return {"ok": False, "status": 503, "error": str(exc)}
    except Exception:  # noqa: BLE001 - the caller gets an answer, not a timeout
        # The details stay in the log: an object-store or KV error names hosts, buckets and keys.
        ref = new_id()[:12]
        log.exception("registry rpc %s failed (error %s; arguments %s)", name, ref,
                      ascii(sorted(args) if isinstance(args, dict) else type(args).__name__)[:300])
        return {"ok": False, "status": 500, "error": f"the registry failed to answer (error {ref}: the registry's log has the details)"}


# The role each operation needs where the registry has API tokens (as over HTTP).
ROLES: dict[str, ApiRole] = {
    "scopes": "reader", "versions": "reader", "lineage": "reader", "feedback": "reader", "feedback_list": "reader",
    "policy_get": "reader", "submit": "producer", "ask": "producer",
    "approve": "operator", "reject": "operator", "rollback": "operator", "pin": "operator", "unpin": "operator",
    "policy_set": "operator", "dead_letters": "operator", "dead_letter_replay": "operator",
}


def register_rpc(broker: NatsBroker, ops: Operations, tokens: Tokens | None = None) -> None:
    for name, call in operations_table(ops).items():
        _subscribe(broker, name, call, tokens or Tokens())


def _subscribe(broker: NatsBroker, name: str, call: Callable[[dict[str, Any]], Awaitable[Any]], tokens: Tokens) -> None:
    role = ROLES[name]

    @broker.subscriber(f"{REGISTRY_RPC}.{name}", queue=QUEUE, title=f"registry-rpc-{name}")
    async def reply(args: Any, message: NatsMessage) -> dict[str, Any]:
        try:
            header = next((v for k, v in (message.headers or {}).items() if k.lower() == "authorization"), None)
            who = authorize(tokens, bearer_token(header), role, f"call {name}", f"rpc {name}")
        except Unauthorized as exc:
            return {"ok": False, "status": exc.status, "error": exc.detail}
        return await answer(call, vouched(args, who), name)


def vouched(args: Any, who: Principal | None) -> Any:
    """The arguments with the token's holder beside the names they give (as the HTTP API does)."""
    if who is None or not isinstance(args, dict):
        return args
    changed = dict(args)
    if isinstance(args.get("operator"), str):
        changed["operator"] = attributed(args["operator"], who)
    if "content" in args:  # a submission: who sent it
        given = args.get("submitted_by")
        changed["submitted_by"] = attributed(given if isinstance(given, str) and given.strip() else who.name, who)
    return changed
