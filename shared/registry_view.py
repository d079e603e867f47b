"""The part of registry state other services read, and per-scope policy.

The registry owns the ``seal_registry`` and ``seal_scope_settings`` KV
buckets and is the only writer of the keys below; the generator, trainer and
evaluator only read them. Keys (``<scope>`` is safe in a KV key by
construction, see :data:`shared.events.SCOPE_PATTERN`):

* ``active.<scope>``: :class:`ActiveAdapter`, the version new updates build on.
* ``probes.<scope>``: :class:`AcceptedProbes`, the probes of the scope's
  accepted feedback: the evaluator's regression set for that scope.
* ``policy.<scope>`` and ``policy._global``: :class:`PolicyAdapterRef`, the
  generator's own policy adapter (ReST-EM outer loop). The registry writes a
  scope's own; ``_global`` (no scope can be named so) is a platform-wide
  fallback that only an operator puts there.
* in ``seal_scope_settings``, key ``<scope>``: :class:`ScopePolicy`.

Writers use :func:`compare_and_set` so two registry replicas cannot overwrite
each other's updates.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel, Field, ValidationError

from shared.events import Contract, ManifestRef, Probe, TrainingDirectives, describe_validation_error
from shared.subjects import KV_REGISTRY, KV_SCOPE_SETTINGS

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ActiveAdapter(Contract):
    scope: str
    version: int
    adapter_id: str
    adapter: ManifestRef
    pinned: bool = False


class AcceptedProbes(Contract):
    scope: str
    # (feedback_id, probe) pairs, oldest first, bounded by the registry.
    probes: tuple[tuple[str, Probe], ...] = ()


class PolicyAdapterRef(Contract):
    adapter_id: str
    adapter: ManifestRef
    round: int = 1


class ScopePolicy(Contract):
    """Per-scope knobs, with production-safe defaults for a scope never configured."""

    # generator
    candidates: int = Field(default=3, ge=1, le=16)
    self_edit_format: Literal["implications", "rewrite", "self_qa", "sampled"] = "sampled"
    model_proposes_directives: bool = False
    # What a 135M model needs to recall a passage's facts closed-book: SEAL's settings (lr 1e-3,
    # 10 epochs, rank 32; lr 1e-4 x 3 epochs teaches nothing, even on the gold pairs, and rank 16
    # or fewer epochs teach less for the same forgetting: bench/tradeoff.py in bench/RESULTS.md);
    # the trainer's rehearsal and the evaluator's regression gate hold forgetting back.
    default_directives: TrainingDirectives = TrainingDirectives(learning_rate=1e-3, epochs=10, lora_rank=32, lora_alpha=64)
    blocklist: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(default=(), max_length=500)
    # A candidate whose training data repeats an earlier candidate's (the usual case with a
    # small model, whose written self-edits rarely survive validation) is tried at the next
    # strength of this ladder instead of being dropped as a duplicate: the same trained update
    # scaled down (TrainingDirectives.adapter_scale), so the regression gate can pick the
    # strongest version that keeps core knowledge. The first candidate of each distinct training
    # data takes the first strength; past the end of the ladder a repeat is a duplicate.
    strength_ladder: tuple[Annotated[float, Field(ge=0.05, le=1.0)], ...] = Field(
        default=(1.0, 0.75, 0.5), min_length=1, max_length=16
    )
    # Every distinct training data at every strength of the ladder: the rungs its candidates did
    # not take become candidates of their own (the same trained weights scaled, so one more
    # evaluation each and no training). Off: only repeated candidates climb the ladder.
    ladder_per_training: bool = True
    # evaluator gates. max_regression_drop is also the registry's margin between candidates of
    # equal reward: one that kept more than this much more of the regression sets wins over a
    # lower index (services/registry/decision.py, select_best_candidate).
    min_gain: float = Field(default=0.01, ge=-1.0, le=1.0)
    max_regression_drop: float = Field(default=0.02, ge=0.0, le=1.0)
    # The largest drop allowed on the probes of any ONE earlier feedback (1.0: no such gate, only
    # the pooled earlier-feedback part above, which dilutes one passage's loss as a scope grows).
    max_feedback_drop: float = Field(default=1.0, ge=0.0, le=1.0)
    # The most core knowledge may have fallen below the base model's, over all the updates of a
    # scope (1.0: no such gate). max_regression_drop bounds each update against its parent, so
    # drops within it could add up without end; this bounds where a scope can drift to.
    max_core_drop_from_base: float = Field(default=0.05, ge=0.0, le=1.0)
    # registry decision
    approval: Literal["auto", "manual"] = "auto"
    # A feedback waits this long for its candidates' outcomes, then is decided with what arrived.
    # One held for an operator (manual approval, a pinned scope) waits for the operator however
    # long: `seal feedback --state awaiting_approval` lists them. At most 30 days (a deadline past
    # the calendar's end failed every later event of the scope).
    decision_timeout_s: float = Field(default=1800.0, gt=0, le=30 * 86400)
    # outer loop (ReST-EM, services/registry/outer_loop.py): the generator's own policy adapter is
    # trained on every this many rewarded self-edits (0: off, the default until a benchmark shows it
    # helps the default model write). A round's examples travel in one event, so at most 32.
    policy_round_examples: int = Field(default=0, ge=0, le=32)
    policy_min_reward: float = Field(default=0.01, ge=-1.0, le=1.0)
    # A policy example is the generator's whole prompt (up to its 1536 tokens) and completion.
    policy_directives: TrainingDirectives = TrainingDirectives(max_seq_len=2048)


def active_key(scope: str) -> str:
    return f"active.{scope}"


def probes_key(scope: str) -> str:
    return f"probes.{scope}"


def policy_key(scope: str | None) -> str:
    return f"policy.{scope or '_global'}"


async def read_model(js: JetStreamContext, bucket: str, key: str, model: type[M]) -> tuple[M | None, int]:
    """The value at ``key`` parsed as ``model`` and its revision (0 when absent)."""
    body, revision = await read_raw(js, bucket, key)
    return (None if body is None else parse_record(model, bucket, key, body)), revision


async def read_raw(js: JetStreamContext, bucket: str, key: str) -> tuple[bytes | None, int]:
    """The stored bytes at ``key`` (None when absent or deleted) and their revision (0 when absent)."""
    kv = await js.key_value(bucket)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, 0
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None, entry.revision or 0
    return entry.value, entry.revision or 0


def parse_record(model: type[M], bucket: str, key: str, body: bytes) -> M:
    """A stored value as ``model``; one that does not parse raises :class:`UnreadableRecord`."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise UnreadableRecord(
            f"the record {key!r} in {bucket} does not parse (written by a newer registry, or damaged): "
            f"{describe_validation_error(exc)}"
        ) from None


def parsed_or_none(model: type[M], bucket: str, key: str, body: bytes, tolerate: bool) -> M | None:
    """A stored value as ``model`` (:func:`parse_record`); with ``tolerate`` one that does not
    parse is None, with the reason in the log (one bad record, hand-edited or written by another
    version, must not hide every other from a listing or the sweep; a repair writes over it)."""
    try:
        return parse_record(model, bucket, key, body)
    except UnreadableRecord as exc:
        if not tolerate:
            raise
        log.warning("not read: %s", exc)
        return None


class UnreadableRecord(RuntimeError):
    """A stored record does not parse. Not the message's fault: a handler that meets one fails
    transiently (retried, then dead-lettered with this reason), never as an invalid payload."""


async def read_active(js: JetStreamContext, scope: str) -> ActiveAdapter | None:
    return (await read_model(js, KV_REGISTRY, active_key(scope), ActiveAdapter))[0]


async def read_accepted_probes(js: JetStreamContext, scope: str) -> AcceptedProbes:
    found = (await read_model(js, KV_REGISTRY, probes_key(scope), AcceptedProbes))[0]
    return found or AcceptedProbes(scope=scope)


async def read_policy_adapter(js: JetStreamContext, scope: str) -> PolicyAdapterRef | None:
    """The scope's policy adapter, else the global one, else None (the base model)."""
    for key in (policy_key(scope), policy_key(None)):
        found = (await read_model(js, KV_REGISTRY, key, PolicyAdapterRef))[0]
        if found is not None:
            return found
    return None


async def read_scope_policy(js: JetStreamContext, scope: str) -> ScopePolicy:
    found = (await read_model(js, KV_SCOPE_SETTINGS, scope, ScopePolicy))[0]
    return found or ScopePolicy()


class ConflictError(Exception):
    """A compare-and-set lost the race too many times."""


async def compare_and_set(
    js: JetStreamContext,
    bucket: str,
    key: str,
    model: type[M],
    change: Callable[[M | None], M | None],
    attempts: int = 20,
    *,
    unreadable_as_absent: bool = False,
) -> M | None:
    """Read, apply ``change``, write only if nobody wrote in between; retry on conflict.

    ``change`` returning None means "leave it as it is". A retry waits a random, growing moment
    first: two writers that retried at once kept colliding, and one of them could lose every
    try against the other's run of writes (a hot key: a scope's head, its accepted probes).
    A stored value that does not parse raises :class:`UnreadableRecord`; with
    ``unreadable_as_absent`` ``change`` sees None instead and may write over it (a repair).
    """
    kv = await js.key_value(bucket)
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 7)))
        body, revision = await read_raw(js, bucket, key)
        current = None if body is None else parsed_or_none(model, bucket, key, body, unreadable_as_absent)
        updated = change(current)
        if updated is None:
            return current
        body = updated.model_dump_json().encode()
        try:
            if revision == 0:
                await kv.create(key, body)
            else:
                await kv.update(key, body, last=revision)
            return updated
        except KeyWrongLastSequenceError:
            continue
        except Exception as exc:  # nats-py reports "key exists" on create races this way
            if "wrong last sequence" in str(exc).lower() or "key exists" in str(exc).lower():
                continue
            raise
    raise ConflictError(f"{bucket}/{key}: gave up after {attempts} conflicting writes")
