"""The outer loop (ReST-EM): rewarded self-edits become training data for the generator itself.

Once a feedback is decided, every candidate of it that passed every gate
with a reward of at least the scope's ``policy_min_reward``, and whose
self-edit kept at least one piece the model wrote (a candidate trained only
on the feedback and the rule-written pairs says nothing about how the model
writes), gives one example: the prompt the generator completed and its
completion. Examples pool per scope in ``policypool.<scope>``; when
``policy_round_examples`` of them are there, the pool is emptied into a
``policy.training_requested`` event (round n+1). The trainer trains the
scope's policy adapter on them, continuing the last round's; the registry
records it as ``policy.<scope>`` and the generator writes with it from then
on.

The scope policy switches the loop on (``policy_round_examples`` > 0; off by
default until a benchmark shows the written self-edits of the default model
get better from it). Every step is idempotent: a feedback is counted once
(its id is kept), and the request's event id is derived from the scope and
the round, so a re-published request is dropped by JetStream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import Field

from shared import events as ev
from shared.contracts import LONG_TEXT_CHARS
from shared.registry_view import ScopePolicy
from shared.subjects import KV_REGISTRY

from .kv import State
from .records import FeedbackRecord, SelfEditRecord, without_published

log = logging.getLogger(__name__)

COUNTED_KEPT = 1000  # feedback ids remembered as counted (a redelivery comes long before 1000 more)


def policy_pool_key(scope: str) -> str:
    return f"policypool.{scope}"


class PolicyPool(ev.Contract):
    """``policypool.<scope>``: rewarded examples waiting for the next round."""

    scope: str
    rounds: int = 0  # rounds requested so far
    examples: tuple[ev.PolicyExample, ...] = ()
    counted: tuple[str, ...] = Field(default=(), description="feedback ids already counted, newest last")
    outbox: tuple[dict[str, Any], ...] = ()  # the round's request until it is published


def rewarded_examples(
    record: FeedbackRecord, self_edits: Mapping[int, SelfEditRecord], policy: ScopePolicy
) -> list[ev.PolicyExample]:
    """The (prompt, completion, reward) examples a decided feedback gives, best reward first."""
    found: dict[str, ev.PolicyExample] = {}
    for cand in sorted(record.candidates, key=lambda c: -(c.reward or 0.0)):
        kept = self_edits.get(cand.index)
        if (
            cand.result != "evaluated"
            or not cand.passed
            or cand.reward is None
            or cand.reward < policy.policy_min_reward
            or kept is None
            or not kept.generator_prompt
            or kept.self_edit.written == 0
        ):
            continue
        completion = kept.self_edit.completion.strip()
        if completion and completion not in found:  # the same completion once, at its best reward
            if max(len(kept.generator_prompt.strip()), len(completion)) > LONG_TEXT_CHARS:
                # A prompt of a long passage can outgrow an example: leave it out, never block the decision.
                log.info("feedback %s candidate %d: prompt or completion too long for a policy example; left out",
                         record.feedback_id, cand.index)
                continue
            found[completion] = ev.PolicyExample(
                prompt=kept.generator_prompt, completion=completion, reward=cand.reward,
                feedback_id=record.feedback_id, self_edit_id=kept.self_edit.self_edit_id,
            )
    return list(found.values())


def with_feedback(
    pool: PolicyPool | None,
    record: FeedbackRecord,
    examples: list[ev.PolicyExample],
    policy: ScopePolicy,
) -> PolicyPool | None:
    """The pool with a decided feedback's examples counted (None: nothing to change).

    When the pool reaches the round size, its examples leave in a request
    put in the outbox, and the pool starts over.
    """
    pool = pool or PolicyPool(scope=record.scope)
    if record.feedback_id in pool.counted:
        return None
    counted = (*pool.counted, record.feedback_id)[-COUNTED_KEPT:]
    waiting = (*pool.examples, *examples)
    if len(waiting) < policy.policy_round_examples:
        return pool.model_copy(update={"counted": counted, "examples": waiting})
    round_no = pool.rounds + 1
    request = ev.PolicyTrainingRequested(
        event_id=ev.derived_id("policy.training_requested", record.scope, round_no),
        feedback_id=record.feedback_id,  # the feedback that completed the round
        scope=record.scope,
        causation_id=record.feedback_event_id,
        examples=waiting,
        directives=policy.policy_directives,
        round=round_no,
    )
    return pool.model_copy(
        update={
            "counted": counted,
            "examples": (),
            "rounds": round_no,
            "outbox": (*pool.outbox, request.model_dump(mode="json")),
        }
    )


async def count_decided(
    record: FeedbackRecord,
    policy: ScopePolicy,
    state: State,
    publish: Callable[[ev.Event], Awaitable[None]],
    self_edit: Callable[[str, str, int], Awaitable[SelfEditRecord | None]],
) -> None:
    """Pool a decided feedback's rewarded self-edits; publish the round's request once the
    pool is full (and any request an earlier attempt failed to publish)."""
    self_edits = {}
    for cand in record.candidates:
        if cand.result == "evaluated" and cand.passed:
            kept = await self_edit(record.scope, record.feedback_id, cand.index)
            if kept is not None:
                self_edits[cand.index] = kept
    examples = rewarded_examples(record, self_edits, policy)
    key = policy_pool_key(record.scope)
    pool = await state.compare_and_set(
        KV_REGISTRY, key, PolicyPool, lambda current: with_feedback(current, record, examples, policy)
    )
    if pool is None or not pool.outbox:
        return
    sent = set()
    for item in pool.outbox:
        await publish(ev.parse_event(item))
        sent.add(item["event_id"])
        log.info("scope %s: outer-loop round %s requested", record.scope, item.get("round"))
    await state.compare_and_set(KV_REGISTRY, key, PolicyPool, lambda current: without_published(current, sent))
