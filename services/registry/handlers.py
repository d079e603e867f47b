"""One plain function per consumed event: validated event + the ledger in.

The ledger records the event on the feedback's record, takes every decision
that became due, and publishes the resulting events through its ``publish``
port (from the record's outbox, so a redelivered message re-publishes the
same event ids instead of new ones).
"""

from __future__ import annotations

from shared import events as ev
from shared.dead_letters import PermanentFailure

from . import intake
from .ledger import Ledger


async def on_feedback_submitted(event: ev.FeedbackSubmitted, ledger: Ledger, trace_id: str | None) -> None:
    await ledger.note(event, intake.note_feedback, trace_id)


async def on_feedback_rejected(event: ev.FeedbackRejected, ledger: Ledger) -> None:
    await ledger.note(event, intake.note_feedback_rejected)


async def on_selfedit_generated(event: ev.SelfEditGenerated, ledger: Ledger) -> None:
    await ledger.note_selfedit(event)
    await ledger.note(event, intake.note_selfedit)


async def on_selfedit_rejected(event: ev.SelfEditRejected, ledger: Ledger) -> None:
    await ledger.note(event, intake.note_selfedit_rejected)


async def on_adapter_trained(event: ev.AdapterTrained, ledger: Ledger) -> None:
    await ledger.note(event, intake.note_trained)


async def on_pipeline_failure(event: ev.Event, ledger: Ledger) -> None:
    """A candidate's training or evaluation failed."""
    if isinstance(event, ev.AdapterTrainingFailed):
        await ledger.note(event, intake.note_training_failed)
    elif isinstance(event, ev.AdapterEvaluationFailed):
        await ledger.note(event, intake.note_evaluation_failed)
    else:
        raise PermanentFailure(f"the registry does not handle {event.type} events")


async def on_adapter_evaluated(event: ev.AdapterEvaluated, ledger: Ledger) -> None:
    await ledger.note(event, intake.note_evaluated)


async def on_policy_trained(event: ev.PolicyAdapterTrained, ledger: Ledger) -> None:
    await ledger.note_policy_trained(event)
