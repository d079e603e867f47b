"""Model loading: the tiny test model and the packaged default, offline."""

from __future__ import annotations

import pytest

from shared.generation import chat_prompt, generate
from shared.models import LoadedModel


def test_tiny_model_is_small_and_has_a_chat_template(tiny_model: LoadedModel) -> None:
    params = sum(p.numel() for p in tiny_model.model.parameters())
    assert params < 500_000
    assert tiny_model.model.config.num_hidden_layers == 2
    prompt = chat_prompt(tiny_model, "What is the capital of France?")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert len(tiny_model.weights_sha256 or "") == 64
    out = generate(tiny_model, [prompt, prompt], max_new_tokens=4)
    assert len(out) == 2 and out[0] == out[1]  # greedy is deterministic


@pytest.mark.slow
def test_default_model_loads_offline_and_knows_paris(default_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_model.model.config.num_hidden_layers == 30
    [[answer]] = generate(default_model, [chat_prompt(default_model, "What is the capital of France?")], max_new_tokens=24)
    assert "Paris" in answer


def test_an_applied_adapter_is_active_inside_its_block_and_gone_after(tiny_model: LoadedModel, tmp_path) -> None:
    from shared.lora import AdapterHost, lora_config

    maker = AdapterHost(tiny_model.model)
    maker.add_fresh("made", lora_config(tiny_model.model, rank=4, alpha=8, target_modules="all-linear"))
    maker.save("made", tmp_path / "adapter")
    maker.remove("made")
    host = AdapterHost(tiny_model.model)
    with host.applied("demo", tmp_path / "adapter"):
        assert host.names == ["demo"] and host.active == "demo"
    assert host.names == []
    with pytest.raises(RuntimeError), host.applied("demo", tmp_path / "adapter"):
        raise RuntimeError("a failure inside the block")
    assert host.names == []  # taken off all the same
