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


def test_generation_stops_on_end_of_turn_end_of_text_and_the_models_own_stop_tokens(tiny_model: LoadedModel) -> None:
    """<|endoftext|> is also the unknown token of these tokenizers: it used to be left out, and a
    model that wrote it ran on past it."""
    vocab = tiny_model.tokenizer.get_vocab()
    ids = tiny_model.stop_token_ids
    assert vocab["<|im_end|>"] in ids and vocab["<|endoftext|>"] in ids
    assert set(tiny_model.model.generation_config.eos_token_id) <= set(ids)


@pytest.mark.slow
def test_default_model_loads_offline_and_knows_paris(default_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_model.model.config.num_hidden_layers == 30
    [[answer]] = generate(default_model, [chat_prompt(default_model, "What is the capital of France?")], max_new_tokens=24)
    assert "Paris" in answer
    vocab = default_model.tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(default_model.stop_token_ids)


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


@pytest.mark.slow
def test_processes_converting_the_same_model_at_once_all_get_one_whole_copy(tmp_path) -> None:
    """The services, the CLI and the tests convert a model on first use; started together on a
    fresh machine they wrote one staging folder at once, and all but one failed to rename it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, time; from pathlib import Path; import shared.models as m; "
        # a slower build, as the default model's 12-16 s conversion is: the processes overlap in it
        "build = m.build_tiny_model; m.build_tiny_model = lambda dest, seed=0: (build(dest, seed), time.sleep(3))[0]; "
        "p = m.cached_tiny_model(Path(sys.argv[1])); print(p, (p / m.META_FILE).read_text().count('weights_sha256'))"
    )
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0, 0, 0], [err[-800:] for _, err, _ in results]
    assert {out.strip() for out, _, _ in results} == {f"{tmp_path / 'tiny-llama'} 1"}
    meta = json.loads((tmp_path / "tiny-llama" / "seal-base.json").read_text())
    assert meta["weights_sha256"] and not (tmp_path / "tiny-llama.partial").exists()


def test_a_model_without_a_chat_template_is_refused_at_load(tiny_model: LoadedModel, tmp_path) -> None:
    # every service asks in chat turns: the first request failed, minutes after a healthy start
    import json
    import shutil

    from shared.models import load_model
    from shared.settings import ModelSettings

    assert tiny_model.path is not None
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model.path, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        load_model(ModelSettings(name=str(plain)))
