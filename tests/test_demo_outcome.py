"""The demo's outcome column: a rejection shows the failed gate first, whole."""

from __future__ import annotations

from types import SimpleNamespace

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


def test_the_lineage_table_walks_from_the_final_version_back_to_the_base(tmp_path) -> None:  # noqa: ANN001
    from test_evaluator_support import dict_store

    from seal.demo import lineage_table
    from shared.store import AdapterManifest

    store = dict_store()
    refs = {}
    for adapter_id, parent in (("v1-adapter", None), ("v2-adapter", "v1-adapter"), ("v3-adapter", "v2-adapter")):
        folder = tmp_path / adapter_id
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        manifest = AdapterManifest(
            adapter_id=adapter_id, scope="demo", base_model="tiny", parent_adapter_id=parent, feedback_ids=(f"fb-{adapter_id}",)
        )
        refs[adapter_id] = store.put_adapter(folder, manifest)
    table = lineage_table(store, SimpleNamespace(adapter=refs["v3-adapter"]))  # the scope's active version
    adapters = list(table.columns[0].cells)
    parents = list(table.columns[1].cells)
    assert adapters == ["v3-adapter", "v2-adapter", "v1-adapter"]
    assert parents == ["v2-adapter", "v1-adapter", "base model"]
