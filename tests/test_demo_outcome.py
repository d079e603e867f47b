"""The demo's outcome column: a rejection shows the failed gate first, whole."""

from __future__ import annotations

from seal.demo import describe_outcome, failed_part
from seal.watch import FeedbackProgress
from shared import events as ev

VERDICT = (
    "passed min_gain: target accuracy 0.0% -> 100.0% (gain +1.000, at least the minimum +0.010; "
    "product probes n/a -> n/a, self-generated 0.0% -> 100.0%); "
    "failed max_regression_drop: core 100.0% -> 74.5% (drop 25.5 points, more than the 2.0 allowed)"
)


def test_a_rejection_shows_the_failed_gate_not_the_passed_ones() -> None:
    assert failed_part(VERDICT).startswith("failed max_regression_drop: core 100.0% -> 74.5%")
    assert failed_part("a person rejected it") == "a person rejected it"
    rejected = ev.AdapterRejected(feedback_id="fb-1", scope="demo", reasons=(VERDICT,))
    text = describe_outcome(FeedbackProgress("fb-1", [rejected]))
    assert text == "rejected: " + failed_part(VERDICT)
    assert "passed min_gain" not in text and "more than the 2.0 allowed" in text
