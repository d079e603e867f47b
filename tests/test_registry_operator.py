"""Operator actions: roll back, pin, unpin, scope policy; each audited with who and why."""

from __future__ import annotations

import asyncio

import pytest
from test_registry_support import evaluated, feedback, make_world, self_edit

from services.registry import actions, handlers, queries
from services.registry.ports import NotFound, Refused
from shared import events as ev
from shared.registry_view import AcceptedProbes, ScopePolicy
from shared.subjects import KV_REGISTRY, OPERATOR_ACTION, subject_for


async def three_versions(w):
    await w.set_policy("acme", candidates=1)
    roots = [feedback(passage=f"Fact number {i}.") for i in range(3)]
    for i, root in enumerate(roots):
        await handlers.on_adapter_evaluated(
            evaluated(root, 0, 1, reward=0.2, parent_version=i or None), w.ledger
        )
    assert [p.version for p in w.bus.of(ev.AdapterPromoted)] == [1, 2, 3]
    return roots


async def test_rollback_moves_active_and_previous_and_is_audited() -> None:
    w = make_world()
    roots = await three_versions(w)
    head = await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v2 and v3 answer badly", "req-1")
    assert (head.version, head.previous_version, head.latest_version) == (1, 3, 3)
    assert head.adapter_id == (await w.ledger.version("acme", 1)).adapter_id
    rolled = w.bus.of(ev.AdapterRolledBack)
    assert [(r.from_version, r.to_version, r.operator, r.reason) for r in rolled] == [
        (3, 1, "sre-alice", "v2 and v3 answer badly")
    ]
    audit = w.bus.of(ev.OperatorAction)
    assert [(a.action, a.operator, a.target_version) for a in audit] == [("rollback", "sre-alice", 1)]
    assert subject_for(audit[0]) == OPERATOR_ACTION
    # The evaluator's regression set follows the active chain again.
    probes = await w.state.read(KV_REGISTRY, "probes.acme", AcceptedProbes)
    assert probes is not None and {fid for fid, _ in probes.probes} == {roots[0].feedback_id}

    # The same request retried (a timeout on the operator's side) is applied once, and announced once.
    before = len(w.bus.events)
    again = await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v2 and v3 answer badly", "req-1")
    assert again.version == 1 and again.previous_version == 3
    assert w.bus.events[before:] == [] and again.outbox == ()

    with pytest.raises(Refused):
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "again", "req-2")
    with pytest.raises(NotFound):
        await actions.rollback(w.ledger, "acme", 9, "sre-alice", "no such version", "req-3")
    # Rolling forward to a later existing version is allowed too.
    await actions.rollback(w.ledger, "acme", 3, "sre-alice", "it was fine after all", "req-4")
    assert (await w.ledger.head("acme")).version == 3  # type: ignore[union-attr]


@pytest.mark.parametrize("then", ["another rollback", "the same request again", "a promotion"])
async def test_a_rollback_whose_announcement_failed_is_announced_by_what_comes_next(then: str) -> None:
    """The head moved, then the bus failed: the audit and adapter.rolled_back wait in the head's
    outbox, and go out (once) with the retry, the scope's next operator action or its next promotion."""
    w = make_world()
    await three_versions(w)
    w.bus.fail_next = 1
    with pytest.raises(ConnectionError):
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-1")
    head = await w.ledger.head("acme")
    assert head is not None and head.version == 1 and len(head.outbox) == 2
    assert not w.bus.of(ev.OperatorAction) and not w.bus.of(ev.AdapterRolledBack)
    if then == "another rollback":  # the operator, told it failed, tries again with a new request
        with pytest.raises(Refused, match="already the active version"):
            await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-2")
    elif then == "the same request again":
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-1")
    else:
        root = feedback(passage="A fourth fact.")
        await handlers.on_adapter_evaluated(evaluated(root, 0, 1, reward=0.2, parent_version=1), w.ledger)
        assert [p.version for p in w.bus.of(ev.AdapterPromoted)] == [1, 2, 3, 4]
    assert [(a.action, a.operator) for a in w.bus.of(ev.OperatorAction)] == [("rollback", "sre-alice")]
    assert [(r.from_version, r.to_version) for r in w.bus.of(ev.AdapterRolledBack)] == [(3, 1)]
    assert (await w.ledger.head("acme")).outbox == ()  # type: ignore[union-attr]


async def test_a_rollback_cut_short_after_its_change_is_announced_by_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry stopped between moving the head and publishing (a crash, a deploy): nobody acts
    on the scope again, and still the sweep publishes the audit and adapter.rolled_back."""
    w = make_world()
    await three_versions(w)

    async def crash(scope: str) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(w.ledger, "flush_head", crash)
    with pytest.raises(SystemExit):
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-1")
    monkeypatch.undo()
    assert not w.bus.of(ev.OperatorAction) and (await w.ledger.head("acme")).version == 1  # type: ignore[union-attr]
    await w.ledger.sweep()
    assert not w.bus.of(ev.OperatorAction)  # a marker this young may be an action still under way: left to it
    w.clock.advance(600)
    await w.ledger.sweep()
    assert [(a.action, a.operator) for a in w.bus.of(ev.OperatorAction)] == [("rollback", "sre-alice")]
    assert [(r.from_version, r.to_version) for r in w.bus.of(ev.AdapterRolledBack)] == [(3, 1)]
    assert await w.state.keys(KV_REGISTRY, "headout.*.*") == []  # nothing left to sweep
    await w.ledger.sweep()
    assert len(w.bus.of(ev.OperatorAction)) == 1


async def test_another_flush_never_removes_the_marker_of_an_action_under_way() -> None:
    """Between a rollback's marker and its change, the scope's head is flushed by something else (the
    sweep, another replica's action, a promotion); then the rollback's own publish fails. Its marker
    is still there, so the sweep publishes its audit."""
    w = make_world()
    await three_versions(w)

    async def flush_in_between(bucket: str, key: str) -> None:
        if key == "active.acme":
            w.state.before_write = None
            await w.ledger.flush_head("acme")
            w.bus.fail_next = 1  # and the rollback's own publish, after its change, fails

    w.state.before_write = flush_in_between
    with pytest.raises(ConnectionError):
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-rb")
    assert len(await w.state.keys(KV_REGISTRY, "headout.*.*")) == 1
    w.clock.advance(600)
    await w.ledger.sweep()
    assert [a.action for a in w.bus.of(ev.OperatorAction)] == ["rollback"]
    assert await w.state.keys(KV_REGISTRY, "headout.*.*") == []


async def test_a_pin_whose_audit_failed_is_audited_by_the_next_try() -> None:
    w = make_world()
    await three_versions(w)
    w.bus.fail_next = 1
    with pytest.raises(ConnectionError):
        await actions.set_pin(w.ledger, "acme", True, "sre-bob", "release freeze", "req-1")
    assert (await w.ledger.head("acme")).pinned and not w.bus.of(ev.OperatorAction)  # type: ignore[union-attr]
    with pytest.raises(Refused, match="already pinned"):
        await actions.set_pin(w.ledger, "acme", True, "sre-bob", "release freeze", "req-2")
    assert [(a.action, a.operator, a.reason) for a in w.bus.of(ev.OperatorAction)] == [("pin", "sre-bob", "release freeze")]


async def test_after_a_rollback_new_versions_number_on_and_stale_work_is_rebased() -> None:
    w = make_world()
    await three_versions(w)
    await actions.rollback(w.ledger, "acme", 1, "sre-alice", "bad", "req-1")
    late = feedback()
    await handlers.on_selfedit_generated(self_edit(late, 0, 1), w.ledger)
    # Trained on v3 before the rollback: must go back to v1, not land on top of v3.
    await handlers.on_adapter_evaluated(evaluated(late, 0, 1, reward=0.2, parent_version=3), w.ledger)
    assert [r.parent_version for r in w.bus.of(ev.RebaseRequested)] == [1]
    await handlers.on_adapter_evaluated(evaluated(late, 0, 1, reward=0.2, parent_version=1, attempt=2), w.ledger)
    promoted = w.bus.of(ev.AdapterPromoted)[-1]
    assert (promoted.version, promoted.previous_version) == (4, 1)
    lineage = await queries.version_lineage(w.ledger, "acme", 4)
    assert [a["version"] for a in lineage["ancestors"]] == [1]


async def test_pin_holds_promotions_until_unpinned() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    first = feedback()
    await handlers.on_adapter_evaluated(evaluated(first, 0, 1, reward=0.2), w.ledger)
    head = await actions.set_pin(w.ledger, "acme", True, "sre-bob", "release freeze", "pin-1")
    assert head.pinned and head.pinned_by == "sre-bob"
    with pytest.raises(Refused):
        await actions.set_pin(w.ledger, "acme", True, "sre-bob", "again", "pin-2")

    held = feedback()
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=1), w.ledger)
    assert w.bus.types()[-1] == "adapter.awaiting_approval"
    record = await w.ledger.find_record(held.feedback_id)
    assert record.state == "awaiting_approval" and record.hold == "pinned"
    assert "pinned at v1 by sre-bob" in record.reasons[0]
    with pytest.raises(Refused, match="pinned"):
        await actions.approve(w.ledger, held.feedback_id, "sre-carol", "ship it")
    assert (await w.ledger.head("acme")).version == 1  # type: ignore[union-attr]

    await actions.set_pin(w.ledger, "acme", False, "sre-bob", "freeze over", "unpin-1")
    promoted = w.bus.of(ev.AdapterPromoted)
    assert [(p.feedback_id, p.version) for p in promoted] == [(first.feedback_id, 1), (held.feedback_id, 2)]
    audit = [(a.action, a.operator, a.reason) for a in w.bus.of(ev.OperatorAction)]
    assert audit == [("pin", "sre-bob", "release freeze"), ("unpin", "sre-bob", "freeze over")]


async def test_unpin_keeps_manual_holds_held() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=1)
    await handlers.on_adapter_evaluated(evaluated(feedback(), 0, 1, reward=0.2), w.ledger)
    await w.set_policy("acme", candidates=1, approval="manual")
    await actions.set_pin(w.ledger, "acme", True, "sre-bob", "freeze", "p1")
    held = feedback()
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=1), w.ledger)
    await actions.set_pin(w.ledger, "acme", False, "sre-bob", "thaw", "p2")
    # Re-decided after the unpin: the manual policy still holds it.
    record = await w.ledger.find_record(held.feedback_id)
    assert record.state == "awaiting_approval" and record.hold == "manual"
    await actions.approve(w.ledger, held.feedback_id, "sre-carol", "reviewed")
    assert (await w.ledger.head("acme")).version == 2  # type: ignore[union-attr]


async def test_approving_after_the_head_moved_rebases_the_held_candidate() -> None:
    w = make_world()
    await w.set_policy("acme", candidates=1, approval="manual")
    a, b = feedback(), feedback()
    await handlers.on_selfedit_generated(self_edit(b, 0, 1), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(a, 0, 1, reward=0.2), w.ledger)
    await handlers.on_adapter_evaluated(evaluated(b, 0, 1, reward=0.2), w.ledger)
    await actions.approve(w.ledger, a.feedback_id, "sre", "ok")
    await actions.approve(w.ledger, b.feedback_id, "sre", "ok")  # trained on the base; v1 is active now
    assert [r.feedback_id for r in w.bus.of(ev.RebaseRequested)] == [b.feedback_id]
    assert (await w.ledger.find_record(b.feedback_id)).state == "rebasing"
    assert (await w.ledger.head("acme")).version == 1  # type: ignore[union-attr]


async def test_pin_and_rollback_need_an_active_version() -> None:
    w = make_world()
    with pytest.raises(NotFound):
        await actions.set_pin(w.ledger, "empty", True, "sre", "why not", "p")
    with pytest.raises(NotFound):
        await actions.rollback(w.ledger, "empty", 1, "sre", "why not", "r")


async def test_scope_policy_is_read_back_and_listed() -> None:
    w = make_world()
    await actions.set_policy(w.ledger, "acme", ScopePolicy(candidates=5, approval="manual"))
    assert (await w.ledger.policy("acme")).candidates == 5
    scopes = await queries.list_scopes(w.ledger)
    assert [(s["scope"], s["approval"], s["active_version"]) for s in scopes] == [("acme", "manual", None)]


async def test_scopes_are_listed_a_page_at_a_time_in_name_order() -> None:
    # thousands of scopes with long pin reasons outgrow one NATS answer: a listing is bounded
    w = make_world()
    for scope in ("globex", "acme", "initech", "hooli", "umbrella"):
        await actions.set_policy(w.ledger, scope, ScopePolicy(candidates=2))
    first = await queries.list_scopes(w.ledger, limit=2)
    assert [s["scope"] for s in first] == ["acme", "globex"]
    rest = await queries.list_scopes(w.ledger, after=first[-1]["scope"], limit=2)
    assert [s["scope"] for s in rest] == ["hooli", "initech"]
    assert [s["scope"] for s in await queries.list_scopes(w.ledger, after="initech")] == ["umbrella"]
    assert await queries.list_scopes(w.ledger, after="umbrella") == []


async def test_an_id_sent_to_two_scopes_is_never_approved_in_the_wrong_one() -> None:
    # a product that publishes on the bus itself can break the ids' uniqueness; acting on either
    # record by id alone would be a guess
    w = make_world()
    for scope in ("acme", "globex"):
        await w.set_policy(scope, candidates=1, approval="manual")
        await handlers.on_adapter_evaluated(evaluated(feedback(scope, "fb-shared"), 0, 1, reward=0.3), w.ledger)
    assert [r.scope for r in await w.ledger.records_of("fb-shared")] == ["acme", "globex"]
    with pytest.raises(Refused, match=r"sent to several scopes \(acme, globex\).*name the scope"):
        await actions.approve(w.ledger, "fb-shared", "sre-carol", "ship it")
    assert w.bus.of(ev.AdapterPromoted) == []
    # named, each is reachable: read, approved, rejected
    from services.registry.operations import Operations, OperatorRequest
    from services.registry.rpc import answer, operations_table

    ops = Operations(lambda: w.ledger, w.bus)
    assert (await ops.feedback("fb-shared", "globex"))["scope"] == "globex"
    approved = await ops.approve("fb-shared", OperatorRequest(operator="sre-carol", reason="ship it"), "acme")
    assert (approved["scope"], approved["state"]) == ("acme", "promoted")
    rejected = await answer(operations_table(ops)["reject"],
                            {"feedback_id": "fb-shared", "scope": "globex", "operator": "sre-carol", "reason": "no"})
    assert rejected["ok"] and rejected["result"]["state"] == "rejected"
    assert [(p.scope, p.version) for p in w.bus.of(ev.AdapterPromoted)] == [("acme", 1)]
    with pytest.raises(NotFound, match="in scope 'initech'"):
        await ops.feedback("fb-shared", "initech")


async def test_an_adapter_gone_from_the_store_is_never_made_active(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scope head is the commit point: an operator's rollback or approval to an adapter that no
    longer reads back is refused before it moves, and a promotion in flight checks it again."""
    w = make_world()
    await three_versions(w)
    gone = await w.ledger.version("acme", 1)
    w.manifests.weightless.add(gone.adapter_id)  # its manifest reads back, its weights are gone
    with pytest.raises(Refused, match="v1's adapter .* cannot be used .*listed in the manifest but missing"):
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-1")
    w.manifests.missing.add(gone.adapter_id)
    with pytest.raises(Refused, match="v1's adapter .* cannot be used"):
        await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v3 answers badly", "req-1")
    assert (await w.ledger.head("acme")).version == 3  # type: ignore[union-attr]

    await w.set_policy("acme", candidates=1, approval="manual")
    held = feedback(passage="Held fact.")
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=3), w.ledger)
    record = await w.ledger.record("acme", held.feedback_id)
    assert record is not None and record.state == "awaiting_approval"
    chosen = record.candidate(record.chosen)  # type: ignore[arg-type]
    w.manifests.missing.add(chosen.adapter_id)  # type: ignore[union-attr]
    with pytest.raises(Refused, match="reject this feedback"):
        await actions.approve(w.ledger, held.feedback_id, "sre-alice", "looks fine")
    # Gone between the approval's check and the promotion: the head stays, the candidate is unusable.
    async def passes(*args: object) -> None:
        return None

    monkeypatch.setattr(actions, "_usable", passes)
    await actions.approve(w.ledger, held.feedback_id, "sre-alice", "looks fine")
    assert (await w.ledger.head("acme")).version == 3  # type: ignore[union-attr]
    after = await w.ledger.record("acme", held.feedback_id)
    assert after is not None and after.state != "promoting"
    assert after.candidate(chosen.index).result == "unusable"  # type: ignore[union-attr]
    assert not w.bus.of(ev.AdapterPromoted)[3:]


async def test_a_retried_rollback_keeps_the_probes_of_a_version_promoted_since() -> None:
    w = make_world()
    roots = await three_versions(w)
    await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v2 and v3 answer badly", "req-1")
    later = feedback(passage="Fact number 4.")
    await handlers.on_adapter_evaluated(evaluated(later, 0, 1, reward=0.2, parent_version=1), w.ledger)
    assert (await w.ledger.head("acme")).version == 4  # type: ignore[union-attr]
    await actions.rollback(w.ledger, "acme", 1, "sre-alice", "v2 and v3 answer badly", "req-1")  # a timeout, retried
    probes = await w.state.read(KV_REGISTRY, "probes.acme", AcceptedProbes)
    assert probes is not None and {fid for fid, _ in probes.probes} == {roots[0].feedback_id, later.feedback_id}


async def test_a_record_held_for_a_pin_that_is_gone_is_decided_by_the_sweep() -> None:
    """An unpin commits, then fails before it decides the held records again: the sweep does it."""
    w = make_world()
    await three_versions(w)
    await actions.set_pin(w.ledger, "acme", True, "sre-alice", "release freeze", "req-pin")
    held = feedback(passage="Fact number 4.")
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=3), w.ledger)
    record = await w.ledger.record("acme", held.feedback_id)
    assert record is not None and (record.state, record.hold) == ("awaiting_approval", "pinned")
    head = await w.ledger.head("acme")
    assert head is not None
    await w.state.put(KV_REGISTRY, "active.acme", head.model_copy(update={"pinned": False, "pinned_by": None, "pin_reason": None}))
    await w.ledger.sweep()
    assert (await w.ledger.head("acme")).version == 4  # type: ignore[union-attr]
    assert (await w.ledger.record("acme", held.feedback_id)).state == "promoted"  # type: ignore[union-attr]


async def test_a_version_listing_is_the_latest_few_and_an_oversized_answer_says_so() -> None:
    from services.registry.rpc import RPC_MAX_ANSWER_BYTES, answer

    w = make_world()
    await three_versions(w)
    assert [v["version"] for v in await queries.list_versions(w.ledger, "acme", limit=2)] == [2, 3]
    assert [v["version"] for v in await queries.list_versions(w.ledger, "acme")] == [1, 2, 3]

    async def huge(args: dict) -> list[str]:
        return ["x" * 1000] * (RPC_MAX_ANSWER_BYTES // 1000 + 1)

    too_big = await answer(huge, {})
    assert too_big["status"] == 413 and "ask for less" in too_big["error"]


async def test_an_unexpected_failure_answers_with_a_reference_not_the_internals(caplog) -> None:
    from services.registry.rpc import answer

    async def broken(args: dict) -> None:
        raise OSError("S3 error at http://minio.internal:9000/seal-adapters/acme/v3 (request 4F2A)")

    failed = await answer(broken, {}, "lineage")
    assert failed["status"] == 500 and "minio.internal" not in failed["error"]
    ref = failed["error"].split("error ")[1].split(":")[0]
    assert ref in caplog.text and "minio.internal" in caplog.text  # the operator finds it in the log


async def test_a_pin_that_lands_during_an_approval_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Approve checks the pin, then a pin commits before the promotion moves the head: the pin,
    checked again at the commit point, wins, and the candidate is held for it."""
    w = make_world()
    await three_versions(w)
    await w.set_policy("acme", candidates=1, approval="manual")
    held = feedback(passage="Fact number 4.")
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3, parent_version=3), w.ledger)

    async def pinned_meanwhile(*args: object) -> None:
        await actions.set_pin(w.ledger, "acme", True, "sre-bob", "release freeze", "req-pin")

    monkeypatch.setattr(actions, "_usable", pinned_meanwhile)  # runs after approve's own pin check
    await actions.approve(w.ledger, held.feedback_id, "sre-alice", "looks fine")
    head = await w.ledger.head("acme")
    assert head is not None and (head.version, head.pinned) == (3, True)
    record = await w.ledger.record("acme", held.feedback_id)
    assert record is not None and (record.state, record.hold) == ("awaiting_approval", "pinned")


async def test_two_operators_changing_different_settings_at_once_both_keep_theirs_and_are_audited() -> None:
    """The merge used to happen before the compare-and-set: the later write replaced the whole
    policy it had read, losing the other operator's change."""
    from services.registry.operations import Operations

    w = make_world()
    ops = Operations(lambda: w.ledger, w.bus)
    first_read = asyncio.Event()
    read = w.ledger.ports.state.read

    async def slow_read(*args: object, **kwargs: object) -> object:  # both read the old policy first
        found = await read(*args, **kwargs)
        first_read.set()
        await asyncio.sleep(0.05)
        return found

    w.ledger.ports.state.read = slow_read  # type: ignore[method-assign]
    await asyncio.gather(
        ops.set_policy("acme", {"candidates": 4}, "sre-alice", "more candidates"),
        ops.set_policy("acme", {"approval": "manual"}, "sre-bob", "release freeze"),
    )
    policy = await w.ledger.policy("acme")
    assert policy.candidates == 4 and policy.approval == "manual"
    audits = w.bus.of(ev.OperatorAction)
    assert sorted((a.action, a.operator) for a in audits) == [("set_policy", "sre-alice"), ("set_policy", "sre-bob")]
    assert any("release freeze" in a.reason and '"approval": "manual"' in a.reason for a in audits)


def test_a_decision_timeout_past_30_days_is_refused() -> None:
    """A deadline past the calendar's end (1e12 s) raised OverflowError on every later event of the scope."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="less than or equal to 2592000"):
        ScopePolicy(decision_timeout_s=1e12)
    assert ScopePolicy(decision_timeout_s=30 * 86400).decision_timeout_s == 2592000


async def test_a_retried_approval_or_rejection_by_its_operator_is_applied_once_and_answered() -> None:
    """The CLI sends an action again after a timeout or a 5xx; when the first try went through,
    the retry used to be refused ("promoted, not awaiting approval") and the CLI exited 1."""
    w = make_world()
    await w.set_policy("acme", candidates=1, approval="manual")
    held, other = feedback(), feedback()
    await handlers.on_adapter_evaluated(evaluated(held, 0, 1, reward=0.3), w.ledger)
    await actions.approve(w.ledger, held.feedback_id, "sre-carol", "reviewed")
    again = await actions.approve(w.ledger, held.feedback_id, "sre-carol", "reviewed")
    assert again.state == "promoted" and len(w.bus.of(ev.AdapterPromoted)) == 1
    with pytest.raises(Refused, match="not awaiting approval"):  # another operator is still told
        await actions.approve(w.ledger, held.feedback_id, "sre-dan", "me too")
    await handlers.on_adapter_evaluated(evaluated(other, 0, 1, reward=0.3, parent_version=1), w.ledger)
    await actions.reject(w.ledger, other.feedback_id, "sre-carol", "memorised the probes")
    assert (await actions.reject(w.ledger, other.feedback_id, "sre-carol", "memorised the probes")).state == "rejected"
    assert len([a for a in w.bus.of(ev.OperatorAction) if a.action == "reject"]) == 1


async def test_a_policy_change_is_refused_whole_for_a_blank_operator_or_a_misspelt_nested_setting() -> None:
    """A blank operator used to be found out only after the write (the change stored, the caller
    told 422, no audit); a misspelt nested key was dropped in silence."""
    from pydantic import ValidationError

    from services.registry.operations import Operations
    from services.registry.ports import InvalidRequest

    w = make_world()
    ops = Operations(lambda: w.ledger, w.bus)
    with pytest.raises(ValidationError):
        await ops.set_policy("acme", {"approval": "manual"}, "   ", "freeze")
    assert (await w.ledger.policy("acme")).approval == "auto" and not w.bus.of(ev.OperatorAction)
    with pytest.raises(InvalidRequest, match="unknown setting.* in default_directives: epohcs"):
        await ops.set_policy("acme", {"default_directives": {"epohcs": 5}}, "sre", "fewer epochs")
    assert (await w.ledger.policy("acme")).default_directives.epochs == 10
