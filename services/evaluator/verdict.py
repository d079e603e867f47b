"""From measured probe sets to scores, reward, gates and reasons. Pure functions.

* **Target** (what the update taught): accuracy on the feedback's probes, the
  product's own and the self-generated ones apart, combined with
  :func:`shared.scoring.weighted_target` (the product's weigh more).
* **Regression** (what it broke): accuracy on the core-knowledge set and on
  the probes of the scope's earlier accepted feedback; the regression score
  is the mean of the two parts that exist.
* **Reward** = candidate target - parent target: SEAL's reward.
* **Gates**, thresholds from the scope's policy:
  ``min_gain``: reward >= min_gain (with no target probes nothing shows the
  update taught anything: the gain counts as 0, which fails a positive
  minimum); ``max_regression_drop``: the largest drop of any regression part
  (core, earlier feedback) is at most the threshold, so a gain on one part
  cannot hide a loss on the other; ``max_feedback_drop`` (below 1, the scope
  policy's choice): the largest drop on the probes of any one earlier feedback
  is at most the threshold. The pooled earlier-feedback part dilutes one
  passage's loss as a scope grows (one probe of 70 is 1.4 points); this gate
  sees each earlier feedback on its own. ``max_core_drop_from_base`` (on a
  continuing update, where the base's core score is known): core accuracy is
  at most that far below the base model's, so per-update drops within
  ``max_regression_drop`` cannot add up without end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.events import GateResult, Scores
from shared.registry_view import ScopePolicy
from shared.scoring import ClosedBookResult, normalize_answer, weighted_target

TARGET_PRODUCT = "target_product"
TARGET_SELF_GENERATED = "target_self_generated"
CORE = "core"
EARLIER_FEEDBACK = "earlier_feedback"
SET_NAMES = (TARGET_PRODUCT, TARGET_SELF_GENERATED, CORE, EARLIER_FEEDBACK)
REGRESSION_PARTS = (CORE, EARLIER_FEEDBACK)
TOLERANCE = 1e-9
MAX_FORGOTTEN_SHOWN = 5


def scores_of(results: Mapping[str, ClosedBookResult], product_weight: float) -> Scores:
    acc = {name: results[name].accuracy if name in results else None for name in SET_NAMES}
    target = weighted_target(acc[TARGET_PRODUCT], acc[TARGET_SELF_GENERATED], product_weight)
    parts = [acc[name] for name in REGRESSION_PARTS if acc[name] is not None]
    details: dict[str, float] = {}
    for name in SET_NAMES:
        result = results.get(name)
        if result is not None and result.total:
            details[f"{name}.correct"] = float(result.correct)
            details[f"{name}.total"] = float(result.total)
            details[f"{name}.f1"] = round(result.mean_f1 or 0.0, 6)
    return Scores(
        target=target,
        target_product=acc[TARGET_PRODUCT],
        target_self_generated=acc[TARGET_SELF_GENERATED],
        regression=sum(parts) / len(parts) if parts else None,
        core=acc[CORE],
        earlier_feedback=acc[EARLIER_FEEDBACK],
        details=details,
    )


@dataclass(frozen=True)
class Verdict:
    reward: float
    passed: bool
    gates: tuple[GateResult, ...]
    reasons: tuple[str, ...]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def gain_gate(candidate: Scores, parent: Scores, min_gain: float) -> GateResult:
    if candidate.target is None or parent.target is None:
        # Nothing shows what the update taught: the gain counts as zero.
        passed = 0.0 >= min_gain - TOLERANCE
        return GateResult(
            gate="min_gain",
            passed=passed,
            value=0.0,
            threshold=min_gain,
            reason=(
                "no probes to measure what the update taught: gain taken as 0, "
                f"{'at least' if passed else 'below'} the minimum {min_gain:+.3f}"
            ),
        )
    gain = candidate.target - parent.target
    passed = gain >= min_gain - TOLERANCE
    return GateResult(
        gate="min_gain",
        passed=passed,
        value=gain,
        threshold=min_gain,
        reason=(
            f"target accuracy {_pct(parent.target)} -> {_pct(candidate.target)} "
            f"(gain {gain:+.3f}, {'at least' if passed else 'below'} the minimum {min_gain:+.3f}; "
            f"product probes {_pct(parent.target_product)} -> {_pct(candidate.target_product)}, "
            f"self-generated {_pct(parent.target_self_generated)} -> {_pct(candidate.target_self_generated)})"
        ),
    )


def regression_gate(candidate: Scores, parent: Scores, max_drop: float) -> GateResult:
    drops = {}
    for name in REGRESSION_PARTS:
        before, after = getattr(parent, name), getattr(candidate, name)
        if before is not None and after is not None:
            drops[name] = before - after
    if not drops:
        return GateResult(
            gate="max_regression_drop",
            passed=True,
            threshold=max_drop,
            reason="no regression probes for this scope and base: nothing to break",
        )
    worst_name = max(drops, key=lambda n: drops[n])
    worst = drops[worst_name]
    passed = worst <= max_drop + TOLERANCE
    described = "; ".join(
        f"{name.replace('_', ' ')} {_pct(getattr(parent, name))} -> {_pct(getattr(candidate, name))}"
        for name in drops
    )
    verdict = "within" if passed else "exceeds"
    return GateResult(
        gate="max_regression_drop",
        passed=passed,
        value=worst,
        threshold=max_drop,
        reason=f"{described} (largest drop {worst:+.3f} on {worst_name.replace('_', ' ')}, {verdict} the allowed {max_drop:.3f})",
    )


def feedback_gate(
    candidate: Mapping[str, ClosedBookResult],
    parent: Mapping[str, ClosedBookResult],
    owners: Mapping[str, str],
    max_drop: float,
) -> GateResult:
    """The largest drop on the probes of any one earlier feedback. ``owners`` maps each earlier
    probe's normalised question to the feedback that brought it."""

    def per_feedback(result: ClosedBookResult | None) -> dict[str, tuple[int, int]]:
        counts: dict[str, tuple[int, int]] = {}
        for item in result.items if result is not None else ():
            owner = owners.get(normalize_answer(item.question))
            if owner is not None:
                right, total = counts.get(owner, (0, 0))
                counts[owner] = (right + int(item.correct), total + 1)
        return counts

    before, after = per_feedback(parent.get(EARLIER_FEEDBACK)), per_feedback(candidate.get(EARLIER_FEEDBACK))
    drops = {o: before[o][0] / before[o][1] - after[o][0] / after[o][1] for o in before if o in after}
    if not drops:
        return GateResult(
            gate="max_feedback_drop", passed=True, threshold=max_drop, reason="no earlier feedback's probes to keep"
        )
    worst = max(drops, key=lambda o: (drops[o], o))
    passed = drops[worst] <= max_drop + TOLERANCE
    return GateResult(
        gate="max_feedback_drop",
        passed=passed,
        value=drops[worst],
        threshold=max_drop,
        reason=(
            f"earlier feedback {worst[:12]} {before[worst][0]}/{before[worst][1]} -> {after[worst][0]}/{after[worst][1]} "
            f"probes (drop {drops[worst]:+.3f}, the largest of {len(drops)} earlier feedback, "
            f"{'within' if passed else 'exceeds'} the allowed {max_drop:.3f})"
        ),
    )


def forgotten(
    candidate: Mapping[str, ClosedBookResult], parent: Mapping[str, ClosedBookResult]
) -> list[str]:
    """Regression questions the parent answered correctly and the candidate no longer does."""
    lines = []
    for name in REGRESSION_PARTS:
        if name not in candidate or name not in parent:
            continue
        before = {item.question: item for item in parent[name].items}
        lost = [
            item
            for item in candidate[name].items
            if not item.correct and item.question in before and before[item.question].correct
        ]
        if lost:
            shown = "; ".join(
                f"{item.question!r} (expected {item.answer!r}, now {item.prediction[:60]!r})"
                for item in lost[:MAX_FORGOTTEN_SHOWN]
            )
            more = f" and {len(lost) - MAX_FORGOTTEN_SHOWN} more" if len(lost) > MAX_FORGOTTEN_SHOWN else ""
            lines.append(f"forgot {len(lost)} {name.replace('_', ' ')} question(s): {shown}{more}")
    return lines


def base_gate(candidate_core: float, base_core: float, max_drop: float) -> GateResult:
    drop = base_core - candidate_core
    passed = drop <= max_drop + TOLERANCE
    return GateResult(
        gate="max_core_drop_from_base",
        passed=passed,
        value=drop,
        threshold=max_drop,
        reason=(
            f"core {_pct(base_core)} on the base model -> {_pct(candidate_core)} after all of the scope's updates "
            f"(drop {drop:+.3f}, {'within' if passed else 'exceeds'} the allowed {max_drop:.3f})"
        ),
    )


def judge_update(
    candidate: Scores,
    parent: Scores,
    policy: ScopePolicy,
    candidate_results: Mapping[str, ClosedBookResult],
    parent_results: Mapping[str, ClosedBookResult],
    owners: Mapping[str, str] | None = None,
    base_core: float | None = None,
) -> Verdict:
    """``owners``: each earlier probe's normalised question -> its feedback id, for the
    per-feedback gate (only where the policy sets ``max_feedback_drop`` below 1); ``base_core``:
    the base model's core accuracy, for the gate on the drift from it (a continuing update)."""
    reward = (
        candidate.target - parent.target if candidate.target is not None and parent.target is not None else 0.0
    )
    gates = (
        gain_gate(candidate, parent, policy.min_gain),
        regression_gate(candidate, parent, policy.max_regression_drop),
    )
    if policy.max_feedback_drop < 1.0:
        gates += (feedback_gate(candidate_results, parent_results, owners or {}, policy.max_feedback_drop),)
    if base_core is not None and candidate.core is not None and policy.max_core_drop_from_base < 1.0:
        gates += (base_gate(candidate.core, base_core, policy.max_core_drop_from_base),)
    passed = all(g.passed for g in gates)
    reasons = [f"{'passed' if g.passed else 'failed'} {g.gate}: {g.reason}" for g in gates]
    reasons += forgotten(candidate_results, parent_results)
    return Verdict(reward=reward, passed=passed, gates=gates, reasons=tuple(reasons))
