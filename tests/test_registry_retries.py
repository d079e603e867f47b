"""An operator's action sent again (its answer was lost, the CLI retries it under the same request
id) changes nothing, even after another operator's action came in between."""

from __future__ import annotations

from test_registry_operator import three_versions
from test_registry_support import make_world

from services.registry import actions
from shared.subjects import OPERATOR_ACTION, subject_for


async def test_a_retried_pin_or_rollback_after_another_action_changes_nothing() -> None:
    w = make_world()
    await three_versions(w)
    await actions.set_pin(w.ledger, "acme", True, "alice", "freeze for the release", "req-a")
    await actions.set_pin(w.ledger, "acme", False, "bob", "release is out", "req-b")
    again = await actions.set_pin(w.ledger, "acme", True, "alice", "freeze for the release", "req-a")
    assert not again.pinned  # bob's unpin stands
    await actions.rollback(w.ledger, "acme", 1, "carol", "v3 answers badly", "req-c")
    await actions.rollback(w.ledger, "acme", 2, "dave", "v2 is better", "req-d")
    again = await actions.rollback(w.ledger, "acme", 1, "carol", "v3 answers badly", "req-c")
    assert again.version == 2  # dave's rollback stands
    audits = [e for e in w.bus.events if subject_for(e) == OPERATOR_ACTION]
    assert [(a.operator, a.action) for a in audits] == [  # one for each action, none for a retry
        ("alice", "pin"), ("bob", "unpin"), ("carol", "rollback"), ("dave", "rollback")]


async def test_a_head_remembers_a_bounded_number_of_requests() -> None:
    from services.registry.records import RECENT_REQUESTS

    w = make_world()
    await three_versions(w)
    for i in range(RECENT_REQUESTS + 6):
        await actions.set_pin(w.ledger, "acme", i % 2 == 0, "alice", "flip", f"req-{i}")
    head = await w.ledger.head("acme")
    assert head is not None and len(head.recent_requests) == RECENT_REQUESTS
    assert head.handled(f"req-{RECENT_REQUESTS + 5}") and not head.handled("req-0")
