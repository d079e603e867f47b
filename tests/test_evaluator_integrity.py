"""Adapters that must not be used are failed with a reason, and the base model stays clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluator_support import (  # noqa: F401 - one_torch_thread is a fixture
    FakeRegistry,
    adapter_trained,
    dict_store,
    one_torch_thread,
    poison_adapter,
    probes_of,
    store_adapter,
    untrained_adapter,
)

from services.evaluator.adapters import AdapterSlot, UnusableAdapter, check_adapter_files
from services.evaluator.app import build_ports
from services.evaluator.handlers import EvaluatorPorts, evaluate_adapter
from services.evaluator.settings import EvaluatorConfig, EvaluatorSettings
from shared import events as ev
from shared.generation import chat_prompt
from shared.models import LoadedModel
from shared.store import AdapterStore, parse_uri

SCOPE = "acme"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROBES = probes_of([("Which river runs past Quellmoor?", "Sallow Brenn")])


@pytest.fixture(scope="module")
def fresh_adapter(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_adapter(tiny_model, tmp_path_factory.mktemp("fresh") / "adapter")


@pytest.fixture
def store() -> AdapterStore:
    return dict_store()


@pytest.fixture
def ports(tiny_model: LoadedModel, store: AdapterStore, tmp_path: Path) -> EvaluatorPorts:
    core = tmp_path / "core.jsonl"
    core.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n')
    settings = EvaluatorSettings(
        evaluator=EvaluatorConfig(core_set_path=core, core_filter="never", work_dir=tmp_path / "work", max_new_tokens=8),
        _secrets_dir=str(tmp_path / "no-secrets"),
    )
    return build_ports(settings, lm=tiny_model, adapters=store, registry=FakeRegistry())


def put(store: AdapterStore, folder: Path, adapter_id: str, base_sha256: str | None) -> ev.ManifestRef:
    return store_adapter(store, folder, scope=SCOPE, adapter_id=adapter_id, base_sha256=base_sha256)


async def failure_of(ports: EvaluatorPorts, event: ev.AdapterTrained) -> str:
    (out,) = await evaluate_adapter(event, ports)
    assert isinstance(out, ev.AdapterEvaluationFailed), out
    assert out.adapter_id == event.adapter_id and out.causation_id == event.event_id
    assert out.self_edit_id == event.self_edit_id and out.candidate_count == event.candidate_count
    return out.reason


def overwrite(store: AdapterStore, ref: ev.ManifestRef, name: str, body: bytes) -> None:
    bucket, prefix = parse_uri(ref.uri)
    store.client.objects[(bucket, f"{prefix}/{name}")] = body  # type: ignore[attr-defined]


async def test_a_good_adapter_is_evaluated(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    ref = put(store, fresh_adapter, "good", tiny_model.weights_sha256)
    (out,) = await evaluate_adapter(adapter_trained(ref, scope=SCOPE, adapter_id="good", probes=PROBES), ports)
    assert isinstance(out, ev.AdapterEvaluated)
    assert out.reward == 0.0  # a fresh LoRA changes nothing
    assert not out.passed  # and so shows no gain


async def test_corrupted_adapter_is_failed_with_the_reason(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    ref = put(store, fresh_adapter, "corrupt", tiny_model.weights_sha256)
    bucket, prefix = parse_uri(ref.uri)
    good = store.client.objects[(bucket, f"{prefix}/adapter_model.safetensors")]  # type: ignore[attr-defined]
    overwrite(store, ref, "adapter_model.safetensors", good[:-8] + b"\x00" * 8)  # one flipped tail
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="corrupt", probes=PROBES))
    assert "integrity check failed" in reason and "adapter_model.safetensors: sha256" in reason
    assert "candidate adapter corrupt" in reason


async def test_forged_manifest_is_failed(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    ref = put(store, fresh_adapter, "forged", tiny_model.weights_sha256)
    forged = ev.ManifestRef(uri=ref.uri, manifest_sha256="0" * 64)
    reason = await failure_of(ports, adapter_trained(forged, scope=SCOPE, adapter_id="forged", probes=PROBES))
    assert "does not match the digest" in reason


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
async def test_non_finite_adapter_is_failed_with_the_reason(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path, tmp_path: Path,
    value: float,
) -> None:
    poisoned = poison_adapter(fresh_adapter, tmp_path / "poisoned", value)
    ref = put(store, poisoned, "poisoned", tiny_model.weights_sha256)  # its sums are right: only the numbers are wrong
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="poisoned", probes=PROBES))
    assert "non-finite weights (NaN or inf): 1 values in" in reason and "lora_B" in reason


async def test_adapter_for_another_base_is_failed(
    ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    ref = put(store, fresh_adapter, "elsewhere", "f" * 64)
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="elsewhere", probes=PROBES))
    assert "trained on base tiny (ffffffffffff..." in reason


async def test_manifest_of_another_adapter_is_failed(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    ref = put(store, fresh_adapter, "someone-else", tiny_model.weights_sha256)
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="claimed", probes=PROBES))
    assert "is for adapter someone-else, not claimed" in reason


async def test_a_continuing_update_is_also_gated_on_its_drift_from_the_base(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    parent = put(store, fresh_adapter, "v1", tiny_model.weights_sha256)
    child = put(store, fresh_adapter, "child", tiny_model.weights_sha256)
    event = adapter_trained(child, scope=SCOPE, adapter_id="child", probes=PROBES, parent=parent, parent_adapter_id="v1")
    (out,) = await evaluate_adapter(event, ports)
    assert isinstance(out, ev.AdapterEvaluated)
    [drift] = [g for g in out.gates if g.gate == "max_core_drop_from_base"]
    assert drift.passed and drift.value == 0.0 and drift.threshold == 0.05  # fresh LoRAs change nothing
    (first,) = await evaluate_adapter(adapter_trained(child, scope=SCOPE, adapter_id="child", probes=PROBES), ports)
    assert "max_core_drop_from_base" not in [g.gate for g in first.gates]  # on the base, the per-update gate says it


async def test_corrupted_parent_fails_the_evaluation(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    parent = put(store, fresh_adapter, "v1", tiny_model.weights_sha256)
    child = put(store, fresh_adapter, "child", tiny_model.weights_sha256)
    overwrite(store, parent, "adapter_config.json", b"{}")
    event = adapter_trained(child, scope=SCOPE, adapter_id="child", probes=PROBES, parent=parent, parent_adapter_id="v1")
    reason = await failure_of(ports, event)
    assert reason.startswith("parent adapter v1: integrity check failed")


@pytest.mark.parametrize("uri", ["s3://Bad_Bucket!/adapters/x", "s3://someone-elses-bucket/adapters/acme/x"])
async def test_an_adapter_outside_the_platforms_bucket_is_failed_with_the_reason(
    ports: EvaluatorPorts, uri: str
) -> None:
    """A bucket name the S3 client refuses (ValueError) or another bucket (AccessDenied) used to escape
    as a transient error: five retries, a dead letter, and no evaluation_failed for the registry."""
    ref = ev.ManifestRef(uri=uri, manifest_sha256="0" * 64)
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="x", probes=PROBES))
    assert "outside the platform's adapter bucket" in reason


async def test_a_parent_from_another_scope_fails_the_evaluation(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    """A weak parent of another scope would make any candidate look like a gain."""
    elsewhere = store_adapter(store, fresh_adapter, scope="other-scope", adapter_id="v1", base_sha256=tiny_model.weights_sha256)
    child = put(store, fresh_adapter, "child", tiny_model.weights_sha256)
    event = adapter_trained(child, scope=SCOPE, adapter_id="child", probes=PROBES, parent=elsewhere, parent_adapter_id="v1")
    reason = await failure_of(ports, event)
    assert reason.startswith("parent adapter v1:") and "of scope 'other-scope'" in reason


async def test_adapter_that_does_not_fit_the_base_is_failed_and_the_base_stays_clean(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    misfit = tmp_path / "misfit"
    shutil.copytree(fresh_adapter, misfit)
    config = json.loads((misfit / "adapter_config.json").read_text())
    config["r"] = 4  # the weights were saved with r=16
    (misfit / "adapter_config.json").write_text(json.dumps(config))
    ref = put(store, misfit, "misfit", tiny_model.weights_sha256)
    prompt = tiny_model.tokenizer([chat_prompt(tiny_model, "Who?")], return_tensors="pt")["input_ids"]
    before = tiny_model.model(prompt).logits
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="misfit", probes=PROBES))
    assert "do not fit the base model" in reason and "size mismatch" in reason
    assert ports.measurer.host.healthy
    assert not hasattr(tiny_model.model, "peft_config")
    assert (tiny_model.model(prompt).logits == before).all()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"r": 10_000_000}, "LoRA rank 10000000 is outside 1..64"),  # PEFT would allocate gigabytes first
        ({"rank_pattern": {"q_proj": 4096}}, "LoRA rank 4096 is outside 1..64"),
        ({"peft_type": "PROMPT_TUNING"}, "only LoRA adapters are used here, not peft_type 'PROMPT_TUNING'"),
        # PEFT rewrites the base layers' weights for these as it loads them; unloading does not undo it
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa' changes the base model's weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights 'olora' changes the base model's weights"),
        ({"bias": "all"}, "would load biases into the base model's layers"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "options this platform never writes are set: layer_replication"),
        ({"use_dora": True, "trainable_token_indices": [1, 2]}, "never writes are set: trainable_token_indices, use_dora"),
    ],
)
async def test_a_config_this_platform_never_writes_is_refused_before_peft_builds_it(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path, tmp_path: Path,
    change: dict, expected: str,
) -> None:
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(fresh_adapter, hostile)
    config = json.loads((hostile / "adapter_config.json").read_text())
    (hostile / "adapter_config.json").write_text(json.dumps({**config, **change}))
    ref = put(store, hostile, "hostile", tiny_model.weights_sha256)
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="hostile", probes=PROBES))
    assert expected in reason
    assert not hasattr(tiny_model.model, "peft_config")


async def test_an_adapter_larger_than_its_base_is_refused_before_it_is_downloaded(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    bloated = tmp_path / "bloated"
    shutil.copytree(fresh_adapter, bloated)
    (bloated / "padding.bin").write_bytes(b"\0" * (ports.max_adapter_bytes or 0))
    ref = put(store, bloated, "bloated", tiny_model.weights_sha256)
    reason = await failure_of(ports, adapter_trained(ref, scope=SCOPE, adapter_id="bloated", probes=PROBES))
    assert f"more than the {ports.max_adapter_bytes} an adapter of this base can need" in reason
    assert not list((ports.work_dir).rglob("padding.bin"))


async def test_an_adapter_of_another_scope_is_refused(
    tiny_model: LoadedModel, ports: EvaluatorPorts, store: AdapterStore, fresh_adapter: Path
) -> None:
    theirs = store_adapter(store, fresh_adapter, scope="globex", adapter_id="theirs", base_sha256=tiny_model.weights_sha256)
    reason = await failure_of(ports, adapter_trained(theirs, scope=SCOPE, adapter_id="theirs", probes=PROBES))
    assert "is of scope 'globex', not 'acme'" in reason


def test_file_checks_name_what_is_wrong(fresh_adapter: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(fresh_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnusableAdapter, match="not a readable safetensors file"):
        check_adapter_files(broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(UnusableAdapter, match="not valid JSON"):
        check_adapter_files(broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(UnusableAdapter, match="adapter_config.json is missing"):
        check_adapter_files(broken)


def test_host_serves_the_base_when_asked_for_no_adapter(tiny_model: LoadedModel) -> None:
    host = AdapterSlot(tiny_model)
    with host.serving(None) as lm:
        assert lm is tiny_model


def test_running_out_of_device_memory_while_attaching_is_not_the_adapters_fault(
    tiny_model: LoadedModel, fresh_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # made UnusableAdapter, a good candidate (or, on its parent, every candidate) failed for good
    import torch
    from peft import PeftModel

    def full(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PeftModel, "load_adapter", full)
    host = AdapterSlot(tiny_model)
    with pytest.raises(torch.OutOfMemoryError), host.serving(fresh_adapter):
        pass
    assert not [n for n, _ in tiny_model.model.named_modules() if "lora" in n.lower()]  # left clean


def test_without_a_weights_digest_on_both_sides_the_base_models_names_must_agree(tmp_path: Path) -> None:
    # a hub model has no digest here: an adapter of another checkpoint with the same shapes loaded without a word
    from services.evaluator.adapters import fetch_adapter
    from shared.store import AdapterManifest

    class Source:
        def get_adapter(self, ref: object, dest: Path, max_bytes: int | None = None) -> AdapterManifest:
            return AdapterManifest(adapter_id="a", scope="acme", base_model="HuggingFaceTB/SmolLM2-360M-Instruct")

    ref = ev.ManifestRef(uri="s3://b/adapters/acme/a", manifest_sha256="0" * 64)
    with pytest.raises(UnusableAdapter, match="trained on base HuggingFaceTB/SmolLM2-360M-Instruct, this one is "
                                              "HuggingFaceTB/SmolLM2-135M-Instruct"):
        fetch_adapter(Source(), ref, tmp_path / "a", adapter_id="a", base_sha256=None, scope="acme",
                      base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
