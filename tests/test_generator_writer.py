"""Generator: the writer on the tiny model and the scope's policy adapter (the outer loop's
product), alone and through the app on real servers."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import nats
import pytest
import torch
from test_generator_service import PASSAGE, app_settings

from services.generator.app import create_app
from services.generator.prompts import Prompt
from services.generator.settings import GeneratorConfig
from services.generator.writer import SelfEditWriter
from shared import events as ev
from shared.broker import publish_event
from shared.models import LoadedModel, load_model
from shared.registry_view import PolicyAdapterRef
from shared.settings import ModelSettings
from shared.store import AdapterManifest


def lora_adapter(lm: LoadedModel, folder: Path, seed: int) -> Path:
    """A LoRA adapter for the tiny model with non-zero weights (so it changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(lm.path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


def fake_fetch(sources: dict[str, Path], base_sha: str | None) -> object:
    def fetch(ref: PolicyAdapterRef, folder: Path) -> AdapterManifest:
        shutil.copytree(sources[ref.adapter_id], folder, dirs_exist_ok=True)
        return AdapterManifest(adapter_id=ref.adapter_id, scope="acme", kind="policy", base_model="tiny",
                               base_model_sha256=base_sha)

    return fetch


def ref(adapter_id: str) -> PolicyAdapterRef:
    return PolicyAdapterRef(
        adapter_id=adapter_id, adapter=ev.ManifestRef(uri=f"s3://b/adapters/acme/{adapter_id}", manifest_sha256="a" * 64)
    )


@pytest.fixture
def own_tiny_model(tiny_model_path: Path) -> LoadedModel:
    """A private copy: adapters loaded here must not leak into the shared session model."""
    return load_model(ModelSettings(name=str(tiny_model_path), device="cpu"))


def test_writer_samples_reproducibly_and_swaps_policy_adapters(own_tiny_model: LoadedModel, tmp_path: Path) -> None:
    tiny_model = own_tiny_model
    sources = {name: lora_adapter(tiny_model, tmp_path / name, seed) for seed, name in enumerate(["pa", "pb"])}
    config = GeneratorConfig(max_new_tokens=12, max_loaded_adapters=1)
    writer = SelfEditWriter(tiny_model, config, fake_fetch(sources, tiny_model.weights_sha256), tmp_path / "cache")
    prompts = [Prompt("Quellmoor received its market charter in 1387."), Prompt("The town", "Question:")]

    base = writer.write(prompts, seed=11)
    assert len(base.completions) == 2 and base.adapter_id is None
    assert writer.write(prompts, seed=11) == base  # seeded: a retry writes the same

    with_a = writer.write(prompts, seed=11, adapter=ref("pa"))
    assert with_a.adapter_id == "pa" and with_a.completions != base.completions
    assert writer.write(prompts, seed=11) == base  # the base model is untouched
    with_b = writer.write(prompts, seed=11, adapter=ref("pb"))
    assert with_b.adapter_id == "pb" and with_b.completions != with_a.completions
    assert len(writer.loaded_adapters) == 1  # "pa" was unloaded
    assert writer.write(prompts, seed=11, adapter=ref("pa")) == with_a  # and comes back the same


def test_writer_refuses_an_adapter_trained_on_another_base(own_tiny_model: LoadedModel, tmp_path: Path) -> None:
    tiny_model = own_tiny_model
    sources = {"pc": lora_adapter(tiny_model, tmp_path / "pc", 3)}
    writer = SelfEditWriter(tiny_model, GeneratorConfig(max_new_tokens=8), fake_fetch(sources, "f" * 64), tmp_path / "c")
    written = writer.write([Prompt("Quellmoor")], seed=1, adapter=ref("pc"))
    assert written.adapter_id is None and writer.loaded_adapters == []
    assert written == writer.write([Prompt("Quellmoor")], seed=1)


@pytest.mark.parametrize("change", [{"r": 8}, {"r": 100_000}])  # weights that do not fit; a rank never trained
def test_a_policy_adapter_that_does_not_load_leaves_the_base_writing(own_tiny_model: LoadedModel, tmp_path: Path, change: dict) -> None:
    tiny_model = own_tiny_model
    source = lora_adapter(tiny_model, tmp_path / "pd", 4)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, **change}))
    writer = SelfEditWriter(tiny_model, GeneratorConfig(max_new_tokens=8), fake_fetch({"pd": source}, tiny_model.weights_sha256),
                            tmp_path / "c")
    base = writer.write([Prompt("Quellmoor")], seed=1)
    written = writer.write([Prompt("Quellmoor")], seed=1, adapter=ref("pd"))
    assert written == base and writer.loaded_adapters == []  # the base wrote, as if there were no adapter
    assert not list((tmp_path / "c").iterdir())
    assert not [n for n, _ in tiny_model.model.named_modules() if "policy_pd" in n]


@pytest.mark.servers
async def test_a_scope_with_a_policy_adapter_writes_with_it(service_settings, adapter_store, tiny_model_path: Path, tmp_path: Path) -> None:
    """The policy adapter comes from the object store and the registry's KV record, on real servers."""
    from shared.models import weights_sha256
    from shared.registry_view import policy_key
    from shared.subjects import KV_REGISTRY

    lm = load_model(ModelSettings(name=str(tiny_model_path), device="cpu"))
    adapter_id = f"policy-{ev.new_id()[:8]}"
    manifest = AdapterManifest(adapter_id=adapter_id, scope="acme-policy", kind="policy", base_model="tiny",
                               base_model_sha256=weights_sha256(tiny_model_path))
    stored = adapter_store.put_adapter(lora_adapter(lm, tmp_path / "lora", seed=5), manifest)
    nc = await nats.connect(service_settings.nats.url)
    js = nc.jetstream()
    kv = await js.key_value(KV_REGISTRY)
    await kv.put(policy_key("acme-policy"), PolicyAdapterRef(adapter_id=adapter_id, adapter=stored).model_dump_json().encode())
    arrived: asyncio.Queue = asyncio.Queue()

    async def collect(msg) -> None:  # noqa: ANN001
        await arrived.put(json.loads(msg.data))

    await nc.subscribe("seal.events.selfedit.>", cb=collect)
    settings = app_settings(
        tmp_path, nats=service_settings.nats, store=service_settings.store, model=service_settings.model,
        generator=GeneratorConfig(max_new_tokens=16, adapter_cache_dir=tmp_path / "adapters"),
    )
    app = create_app(settings)
    await app.start()
    try:
        feedback = ev.FeedbackSubmitted(
            feedback_id=ev.new_id(), scope="acme-policy", content=ev.KnowledgeFeedback(passage=PASSAGE, title="Quellmoor")
        )
        await publish_event(app.broker, feedback)
        events = []
        while len(events) < 3:
            body = await asyncio.wait_for(arrived.get(), 120)
            if body["feedback_id"] == feedback.feedback_id:
                events.append(body)
    finally:
        await app.stop()
        await kv.delete(policy_key("acme-policy"))
        await nc.close()
    generated = [e for e in events if e["type"] == "selfedit.generated"]
    assert generated and {e["generator_adapter"] for e in generated} == {adapter_id}



def test_a_prompt_over_the_budget_loses_its_beginning_not_its_end(tiny_model: LoadedModel, monkeypatch, caplog) -> None:
    """The end of a prompt is the assistant's turn: cut there, the model would go on with the
    passage instead of answering."""
    import logging

    from shared.generation import generate

    seen: dict[str, list[int]] = {}
    original = tiny_model.model.generate

    def spy(**kwargs: object) -> object:
        seen["ids"] = kwargs["input_ids"][0].tolist()  # type: ignore[index]
        return original(**kwargs)

    monkeypatch.setattr(tiny_model.model, "generate", spy)
    prompt = " ".join(f"fact {i}." for i in range(100)) + " Answer now:"
    side = tiny_model.tokenizer.truncation_side
    with caplog.at_level(logging.WARNING, logger="shared.generation"):
        generate(tiny_model, [prompt], max_new_tokens=1, temperature=0, max_prompt_tokens=16)
    assert seen["ids"] == tiny_model.tokenizer(prompt, add_special_tokens=False)["input_ids"][-16:]
    assert "cut to its last 16" in caplog.text
    assert tiny_model.tokenizer.truncation_side == side


def test_a_writer_removes_the_adapter_folder_it_made(tiny_model: LoadedModel, tmp_path: Path) -> None:
    import gc

    own = SelfEditWriter(tiny_model, GeneratorConfig(max_new_tokens=8))
    made = own.cache_dir
    given = SelfEditWriter(tiny_model, GeneratorConfig(max_new_tokens=8), cache_dir=tmp_path / "kept")
    given.cache_dir.mkdir()
    assert made.is_dir()
    del own, given
    gc.collect()
    assert not made.exists() and (tmp_path / "kept").is_dir()


def test_a_writer_keeps_its_adapters_in_a_folder_of_its_process_and_clears_what_gone_ones_left(monkeypatch, tmp_path) -> None:
    import os
    import tempfile

    from services.generator.writer import SelfEditWriter

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / "seal-generator-adapters" / "999999999" / "writer-x" / "policy-a"  # a killed process's
    left.mkdir(parents=True)
    writer = SelfEditWriter(None, GeneratorConfig())  # type: ignore[arg-type]
    assert not left.exists()
    assert writer.cache_dir.parent == tmp_path / "seal-generator-adapters" / str(os.getpid())
    folder = writer.cache_dir
    del writer
    assert not folder.exists()  # removed with the writer
