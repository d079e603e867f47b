"""adapter.trained in, adapter.evaluated or adapter.evaluation_failed out.

:func:`evaluate_adapter` is a plain function of the event and the ports it
needs; the FastStream subscriber in :mod:`services.evaluator.app` only calls
it and publishes what it returns. An adapter that fails a check (corrupted
bytes, a manifest for another adapter or base, NaN or inf weights, weights
that do not fit the base) is a permanent failure: it yields
``adapter.evaluation_failed`` with the reason, and the message is acked.
Store or broker trouble raises, so the message is retried. Redelivery
publishes the same event ids (:meth:`Event.caused`), so JetStream drops
copies; greedy decoding makes the scores themselves repeatable.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from opentelemetry import trace

from services.evaluator.adapters import AdapterSource, UnusableAdapter, fetch_adapter
from services.evaluator.measurement import Measurer, adapter_model_key, base_model_key
from services.evaluator.verdict import (
    CORE,
    EARLIER_FEEDBACK,
    TARGET_PRODUCT,
    TARGET_SELF_GENERATED,
    judge_update,
    scores_of,
)
from shared.events import (
    AdapterEvaluated,
    AdapterEvaluationFailed,
    AdapterTrained,
    Event,
    ManifestRef,
    Probe,
    probes_by_source,
)
from shared.registry_view import AcceptedProbes, ScopePolicy
from shared.scoring import ClosedBookResult, normalize_answer, rules_only
from shared.telemetry import current_trace_id

log = logging.getLogger(__name__)


class RegistryReader(Protocol):
    """What the evaluator reads of registry state (KV in production)."""

    async def accepted_probes(self, scope: str) -> AcceptedProbes: ...

    async def scope_policy(self, scope: str) -> ScopePolicy: ...


@dataclass
class EvaluatorPorts:
    adapters: AdapterSource
    registry: RegistryReader
    measurer: Measurer
    core_set: Sequence[Probe]
    base_sha256: str | None
    model_name: str
    work_dir: Path
    product_weight: float = 2.0
    # The most an adapter's files may hold (the base model's own weights: None, no limit).
    max_adapter_bytes: int | None = None
    # The latest adapter ids, newest last (for /readyz and tests); bounded, as the service runs for months.
    evaluated: deque[str] = field(default_factory=lambda: deque(maxlen=100))


def earlier_probes(event: AdapterTrained, accepted: AcceptedProbes) -> dict[str, tuple[str, Probe]]:
    """The scope's accepted probes that guard earlier feedback, by normalised question, with the
    feedback that brought each: not this feedback's own, nor a question the new feedback asks
    again (a correction changes the expected answer); the newest accepted answer wins."""
    asked_now = {normalize_answer(p.question) for p in event.probes}
    earlier: dict[str, tuple[str, Probe]] = {}
    for feedback_id, probe in accepted.probes:
        key = normalize_answer(probe.question)
        if feedback_id != event.feedback_id and key not in asked_now:
            earlier[key] = (feedback_id, probe)
    return earlier


def probe_sets(
    event: AdapterTrained, earlier: dict[str, tuple[str, Probe]], core: Sequence[Probe]
) -> dict[str, tuple[Probe, ...]]:
    """The four sets a candidate is measured on (``earlier``: :func:`earlier_probes`)."""
    product, self_generated = probes_by_source(event.probes)
    return {
        TARGET_PRODUCT: product,
        TARGET_SELF_GENERATED: self_generated,
        CORE: tuple(core),
        EARLIER_FEEDBACK: tuple(probe for _, probe in earlier.values()),
    }


async def evaluate_adapter(event: AdapterTrained, ports: EvaluatorPorts) -> list[Event]:
    policy = await ports.registry.scope_policy(event.scope)
    accepted = await ports.registry.accepted_probes(event.scope)
    earlier = earlier_probes(event, accepted)
    sets = probe_sets(event, earlier, ports.core_set)
    owners = {key: feedback_id for key, (feedback_id, _) in earlier.items()}
    trace_id = current_trace_id()
    events = await asyncio.to_thread(_evaluate, event, sets, owners, policy, ports, trace_id)
    span = trace.get_current_span()
    for out in events:
        if isinstance(out, AdapterEvaluated):
            span.set_attribute("seal.reward", out.reward)
            span.set_attribute("seal.passed", out.passed)
        else:
            span.set_attribute("seal.evaluation_failed", True)
    return events


def _failed(event: AdapterTrained, reason: str) -> AdapterEvaluationFailed:
    log.warning("evaluation of %s failed: %s", event.adapter_id, reason)
    return event.caused(
        AdapterEvaluationFailed,
        key=event.adapter_id,
        adapter_id=event.adapter_id,
        self_edit_id=event.self_edit_id,
        candidate_index=event.candidate_index,
        candidate_count=event.candidate_count,
        reason=reason,
    )


def _evaluate(
    event: AdapterTrained,
    sets: dict[str, tuple[Probe, ...]],
    owners: dict[str, str],
    policy: ScopePolicy,
    ports: EvaluatorPorts,
    trace_id: str | None,
) -> list[Event]:
    ports.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eval-", dir=ports.work_dir) as tmp:
        candidate_dir = Path(tmp) / "candidate"
        try:
            fetch_adapter(
                ports.adapters,
                event.adapter,
                candidate_dir,
                adapter_id=event.adapter_id,
                base_sha256=ports.base_sha256,
                scope=event.scope,
                max_bytes=ports.max_adapter_bytes,
                base_model=ports.model_name,
            )
        except UnusableAdapter as exc:
            return [_failed(event, f"candidate adapter {event.adapter_id}: {exc}")]

        parent_ref = event.parent_adapter
        parent_key, parent_dir = _parent(event, parent_ref, Path(tmp) / "parent", ports)
        misses = ports.measurer.judge_misses
        try:
            parent_results = ports.measurer.measure(parent_key, parent_dir, sets)
        except UnusableAdapter as exc:
            return [_failed(event, f"parent adapter {event.parent_adapter_id or parent_ref}: {exc}")]
        candidate_key = adapter_model_key(ports.base_sha256, ports.model_name, event.adapter.manifest_sha256)
        try:
            candidate_results = ports.measurer.measure(candidate_key, lambda: candidate_dir, sets)
        except UnusableAdapter as exc:
            return [_failed(event, f"candidate adapter {event.adapter_id}: {exc}")]

    base = _base_core(ports, policy) if parent_ref is not None else None
    if ports.measurer.judge_misses != misses:
        # The judge went quiet during this evaluation: one side (say the parent, from the cache)
        # may carry its verdicts and the other not. Compare what the rules alone say, on every side.
        log.warning("adapter %s: the judge gave no verdict on some answers; graded by the rules alone", event.adapter_id)
        parent_results = {name: rules_only(r) for name, r in parent_results.items()}
        candidate_results = {name: rules_only(r) for name, r in candidate_results.items()}
        base = rules_only(base) if base is not None else None
    base_core = base.accuracy if base is not None else None
    candidate = scores_of(candidate_results, ports.product_weight)
    parent = scores_of(parent_results, ports.product_weight)
    verdict = judge_update(candidate, parent, policy, candidate_results, parent_results, owners, base_core=base_core)
    ports.evaluated.append(event.adapter_id)
    log.info(
        "adapter %s (scope %s): reward %+.3f, %s", event.adapter_id, event.scope, verdict.reward,
        "passed" if verdict.passed else "failed",
    )
    return [
        event.caused(
            AdapterEvaluated,
            key=event.adapter_id,
            adapter_id=event.adapter_id,
            self_edit_id=event.self_edit_id,
            candidate_index=event.candidate_index,
            candidate_count=event.candidate_count,
            parent_adapter_id=event.parent_adapter_id,
            parent_version=event.parent_version,
            parent_adapter=event.parent_adapter,
            adapter=event.adapter,
            candidate_scores=candidate,
            parent_scores=parent,
            reward=verdict.reward,
            passed=verdict.passed,
            gates=verdict.gates,
            reasons=verdict.reasons,
            probes=event.probes,
            trace_id=trace_id or event.trace_id,
        )
    ]


def _base_core(ports: EvaluatorPorts, policy: ScopePolicy) -> ClosedBookResult | None:
    """The base model's core results (measured once, then from the cache), where a gate needs them."""
    if not ports.core_set or policy.max_core_drop_from_base >= 1.0:
        return None
    return ports.measurer.measure(base_model_key(ports.base_sha256, ports.model_name), lambda: None, {CORE: ports.core_set})[CORE]


def _parent(event: AdapterTrained, ref: ManifestRef | None, dest: Path, ports: EvaluatorPorts):  # noqa: ANN202
    """The parent's cache key and a function that fetches it only when it must be measured."""
    if ref is None:
        return base_model_key(ports.base_sha256, ports.model_name), lambda: None

    def fetch() -> Path:
        fetch_adapter(
            ports.adapters, ref, dest, adapter_id=event.parent_adapter_id, base_sha256=ports.base_sha256,
            scope=event.scope, max_bytes=ports.max_adapter_bytes, base_model=ports.model_name,
        )
        return dest

    return adapter_model_key(ports.base_sha256, ports.model_name, ref.manifest_sha256), fetch
