"""Trainer: the inner loop on the tiny model (learning, determinism, failure, adapter swaps)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.trainer.examples import IGNORE, plan_epoch, text_examples
from services.trainer.inner_loop import TrainingInterrupted, mean_token_loss
from services.trainer.lora_training import Layout, LoraTrainer, TrainingJob, TrainingRejected
from shared.events import TrainingDirectives
from shared.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TEXTS = (
    "the town of green river was founded in one thousand and the duke built a market",
    "what is the capital of the country? the capital is blue town",
    "the population of red city was four thousand",
)
FAST = TrainingDirectives(learning_rate=1e-3, epochs=8, lora_rank=8, lora_alpha=16, batch_size=4, seed=3)


@pytest.fixture
def trainer(tiny_model, tmp_path: Path) -> LoraTrainer:
    return LoraTrainer(tiny_model, tmp_path)


def logits(model: torch.nn.Module, tiny_model) -> torch.Tensor:
    ids = torch.tensor([tiny_model.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_training_lowers_the_loss_on_the_self_edit(trainer: LoraTrainer, tiny_model) -> None:
    examples = text_examples(tiny_model.tokenizer, TEXTS, 256)
    before = mean_token_loss(tiny_model.model, examples, tiny_model.device)
    result = trainer.train(TrainingJob("lowers", FAST, texts=TEXTS))
    trainer.host.load("lowers", result.directory)
    try:
        after = mean_token_loss(trainer.host.model, examples, tiny_model.device)
    finally:
        trainer.host.remove("lowers")
    assert result.run.loss_curve[-1] < result.run.loss_curve[0]
    assert after < before - 0.05, (before, after)
    assert result.run.steps == FAST.epochs  # 3 examples, batch 4: one step per epoch
    assert result.run.processed_tokens == result.run.target_tokens + 3 * FAST.epochs  # packed: no padding
    assert result.lora["r"] == 8 and result.lora["origin"] == "fresh"


def test_the_stored_directory_loads_with_peft_and_gives_the_same_logits(trainer: LoraTrainer, tiny_model) -> None:
    result = trainer.train(TrainingJob("same-logits", FAST, texts=TEXTS))
    assert sorted(p.name for p in result.directory.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    trainer.host.load("same-logits", result.directory)
    try:
        trained = logits(trainer.host.model, tiny_model)
    finally:
        trainer.host.remove("same-logits")
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model.path)
    reloaded = PeftModel.from_pretrained(fresh_base, str(result.directory))
    assert torch.allclose(logits(reloaded, tiny_model), trained, atol=1e-5)
    assert not torch.allclose(logits(tiny_model.model, tiny_model), trained, atol=1e-3)  # it did learn something


def test_same_job_same_seed_same_adapter(trainer: LoraTrainer, tiny_model, tmp_path: Path) -> None:
    first = trainer.train(TrainingJob("seeded-a", FAST, texts=TEXTS))
    # Another trainer process (not this one, which would reuse its training): trained again, same weights.
    second = LoraTrainer(tiny_model, tmp_path / "other").train(TrainingJob("seeded-b", FAST, texts=TEXTS))
    assert second.reused_from is None
    assert first.run.loss_curve == second.run.loss_curve
    assert (first.directory / ADAPTER_WEIGHTS).read_bytes() == (second.directory / ADAPTER_WEIGHTS).read_bytes()


def test_a_gentler_strength_of_the_same_job_scales_the_training_without_repeating_it(trainer: LoraTrainer) -> None:
    full = trainer.train(TrainingJob("ladder-0", FAST, texts=TEXTS))
    half = trainer.train(TrainingJob("ladder-1", FAST.model_copy(update={"adapter_scale": 0.5}), texts=TEXTS))
    other = trainer.train(TrainingJob("other-data", FAST.model_copy(update={"adapter_scale": 0.5}), texts=TEXTS[:2]))
    assert (full.reused_from, half.reused_from, other.reused_from) == (None, "ladder-0", None)
    assert (full.adapter_scale, half.adapter_scale) == (1.0, 0.5)
    assert half.run.loss_curve == full.run.loss_curve  # the very training, reported as such
    assert half.directory != full.directory and half.directory.name == "ladder-1"
    a, b = load_file(str(full.directory / ADAPTER_WEIGHTS)), load_file(str(half.directory / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for key in a:
        expected = a[key].float() * (0.5 if ".lora_B." in key else 1.0)
        assert torch.allclose(b[key].float(), expected, rtol=1e-2, atol=1e-6), key
    assert any(a[k].abs().sum() > 0 for k in a if ".lora_B." in k)  # trained: B is not all zeros


def test_a_replaying_job_also_learns_the_earlier_updates_sequences(trainer: LoraTrainer, tiny_model) -> None:
    earlier = ("the old mill of blue town ground corn for the duke", "the mill burned down in the dry year")
    plain = trainer.train(TrainingJob("plain", FAST, texts=TEXTS[:1]))
    replaying = trainer.train(TrainingJob("replaying", FAST, texts=TEXTS[:1], replay=(earlier,), replay_per_epoch=4))
    assert (plain.replayed_per_epoch, replaying.replayed_per_epoch) == (0, 2)  # both earlier sequences, every epoch
    mill = text_examples(tiny_model.tokenizer, earlier[:1], 256)
    losses = []
    for result, name in ((plain, "plain"), (replaying, "replaying")):
        trainer.host.load(name, result.directory)
        try:
            losses.append(mean_token_loss(trainer.host.model, mill, tiny_model.device))
        finally:
            trainer.host.remove(name)
    assert losses[1] < losses[0] - 0.05, losses  # trained on the replayed sequence; the plain job never saw it
    assert replaying.run.target_tokens > plain.run.target_tokens
    # Replay is part of what the training is: the same job without it is not reused.
    assert trainer.training_key(TrainingJob("a", FAST, texts=TEXTS[:1])) != trainer.training_key(
        TrainingJob("b", FAST, texts=TEXTS[:1], replay=(earlier,), replay_per_epoch=4)
    )


def test_an_earlier_update_with_question_answer_pairs_replays_the_pairs_alone(trainer: LoraTrainer, tiny_model) -> None:
    passage = "the old mill of blue town ground corn for the duke until it burned down in the dry year"
    pair = "Question: Who owned the mill?\nAnswer: the duke"
    only_prose = ("the mill had four stones", "its wheel was made of oak")
    job = TrainingJob("r", FAST, texts=TEXTS[:1], replay=((passage, pair), only_prose), replay_per_epoch=8)
    with_pairs, without = trainer.replay_examples(job)
    assert len(with_pairs) == 1 and len(without) == 2
    learned = tiny_model.tokenizer.decode([t for t in with_pairs[0].labels if t != IGNORE])
    assert "the duke" in learned and "Who owned" not in learned and "corn" not in learned
    assert [e.input_ids for e in without] == [e.input_ids for e in text_examples(tiny_model.tokenizer, only_prose, 256)]


def test_updates_swap_adapters_on_one_base_model(trainer: LoraTrainer, tiny_model) -> None:
    base = tiny_model.model
    before = logits(base, tiny_model)
    parent = trainer.train(TrainingJob("scope-a-v1", FAST, texts=TEXTS))
    other_scope = trainer.train(TrainingJob("scope-b-v1", FAST.model_copy(update={"lora_rank": 2}), texts=TEXTS[:1]))
    child = trainer.train(
        TrainingJob("scope-a-v2", FAST.model_copy(update={"lora_rank": 4}), texts=TEXTS[1:], parent_dir=parent.directory)
    )
    assert trainer.lm.model is base and trainer.host.base is base
    assert trainer.host.names == []  # nothing stays loaded between updates
    assert torch.equal(logits(base, tiny_model), before)  # the base weights never change
    assert other_scope.lora["r"] == 2
    assert child.lora == {**parent.lora, "origin": "parent"}  # the parent's rank wins over the directive's
    # The child continued from the parent: it starts where the parent ended, not from scratch.
    fresh = trainer.train(TrainingJob("scope-a-fresh", FAST, texts=TEXTS[1:]))
    assert child.run.loss_curve[0] < fresh.run.loss_curve[0]


def test_packed_step_loss_equals_separate_sequences(tiny_model) -> None:
    """Packing must not let one example see another: same loss as one example at a time."""
    examples = text_examples(tiny_model.tokenizer, TEXTS, 256)
    [step] = plan_epoch(examples, batch_size=3, row_tokens=512, pass_tokens=4096, pad_id=0, seed=0)
    [rows] = step.passes
    assert rows.input_ids.shape[0] == 1
    with torch.no_grad():
        packed = tiny_model.model(
            input_ids=rows.input_ids, position_ids=rows.position_ids, labels=rows.labels, use_cache=False
        ).loss
    separate = mean_token_loss(tiny_model.model, examples, tiny_model.device)
    assert float(packed) == pytest.approx(separate, abs=1e-4)


def test_a_non_finite_loss_fails_the_candidate_and_saves_nothing(trainer: LoraTrainer, tiny_model, tmp_path) -> None:
    weight = tiny_model.model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    weight.data[0, 0] = float("nan")
    try:
        with pytest.raises(TrainingRejected, match="diverged: loss became nan"):
            trainer.train(TrainingJob("broken", FAST, texts=TEXTS))
    finally:
        weight.data.copy_(saved)
    assert not (trainer.outputs / "broken").exists() and trainer.outputs.parent == tmp_path / "trained"
    assert trainer.host.names == []


def test_a_stopped_trainer_ends_a_running_training_before_its_next_step_and_saves_nothing(tiny_model, tmp_path) -> None:
    trainer = LoraTrainer(tiny_model, tmp_path, Layout(step_pause_s=0.05))
    job = TrainingJob("stopped", FAST.model_copy(update={"epochs": 200}), texts=TEXTS)  # 10 s unstopped
    timer = threading.Timer(0.5, trainer.stop)
    timer.start()
    with pytest.raises(TrainingInterrupted, match=r"stopped before step \d+ of 200"):
        trainer.train(job)
    timer.join()
    assert not (trainer.outputs / "stopped").exists() and trainer.outputs.parent == tmp_path / "trained"
    assert trainer.host.names == []
    # a job that starts after the stop (the process is on its way out) takes no step
    with pytest.raises(TrainingInterrupted, match="before step 1 of"):
        trainer.train(TrainingJob("later", FAST, texts=TEXTS))


def test_nothing_to_learn_is_rejected(trainer: LoraTrainer) -> None:
    with pytest.raises(TrainingRejected, match="nothing to train"):
        trainer.train(TrainingJob("empty", FAST.model_copy(update={"max_seq_len": 16}), pairs=(("the river " * 50, "blue"),)))


def test_policy_pairs_train_the_completion_only(trainer: LoraTrainer) -> None:
    pairs = (("Rewrite: the town was founded in 1387.", "The town is from 1387."),) * 2
    result = trainer.train(TrainingJob("policy", FAST, pairs=pairs))
    assert result.run.loss_curve[-1] < result.run.loss_curve[0]
    completion_tokens = result.run.target_tokens // FAST.epochs // 2
    assert 3 <= completion_tokens < 20  # the completion and its end-of-turn, not the chat prompt


def test_paused_layout_only_slows_training(tiny_model, tmp_path) -> None:
    paused = LoraTrainer(tiny_model, tmp_path, Layout(step_pause_s=0.01))
    quick = LoraTrainer(tiny_model, tmp_path / "q")
    job = TrainingJob("paced", FAST.model_copy(update={"epochs": 2}), texts=TEXTS)
    assert paused.train(job).run.loss_curve == quick.train(job).run.loss_curve


def test_a_parent_that_does_not_fit_the_base_is_rejected(trainer: LoraTrainer, tiny_model, tmp_path) -> None:
    parent = trainer.train(TrainingJob("misfit-parent", FAST, texts=TEXTS))
    config = parent.directory / ADAPTER_CONFIG
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "r": settings["r"] + 3}))  # weights no longer fit their config
    with pytest.raises(TrainingRejected, match="parent adapter does not load"):
        trainer.train(TrainingJob("misfit-child", FAST, texts=TEXTS, parent_dir=parent.directory))
    assert trainer.host.names == []
    # and no half-loaded layer of it stays in the shared base model
    assert not [n for n, _ in tiny_model.model.named_modules() if "misfit" in n]


def test_a_device_out_of_memory_while_loading_the_parent_is_transient_not_a_rejection(
    trainer: LoraTrainer, monkeypatch
) -> None:
    """Out of memory is the device's state now (another job on the GPU), not the candidate's
    fault: it is retried as a failure in training is, not published as a permanent failure."""
    from peft import PeftModel

    parent = trainer.train(TrainingJob("oom-parent", FAST, texts=TEXTS))

    def full(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # where the parent's weights are loaded (AdapterHost.load made any error a ValueError, so
    # the trainer's own check for out of memory never saw one)
    monkeypatch.setattr(PeftModel, "load_adapter", full)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train(TrainingJob("oom-child", FAST, texts=TEXTS, parent_dir=parent.directory))
    assert trainer.host.names == []


def test_question_answer_sequences_are_trained_as_chat_turns() -> None:
    from services.trainer.examples import split_question_answers

    texts, pairs = split_question_answers((
        "Question: Which duke granted the charter?\nAnswer: Duke Aldric Venmoor granted it in 1387.",
        "Quellmoor\nQuellmoor is a market town.",
        "Question: two lines\nof question\nAnswer: is not a pair",
    ))
    assert pairs == (("Which duke granted the charter?", "Duke Aldric Venmoor granted it in 1387."),)
    assert texts == ("Quellmoor\nQuellmoor is a market town.", "Question: two lines\nof question\nAnswer: is not a pair")


@pytest.mark.parametrize(
    ("targets", "expected"),
    [("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}), ("mlp", {"gate_proj", "up_proj", "down_proj"})],
)
def test_a_directive_can_target_the_attention_or_the_feed_forward_layers_alone(
    trainer: LoraTrainer, targets: str, expected: set[str]
) -> None:
    directives = FAST.model_copy(update={"target_modules": targets, "epochs": 1})
    result = trainer.train(TrainingJob(f"only-{targets}", directives, texts=TEXTS))
    config = json.loads((result.directory / ADAPTER_CONFIG).read_text())
    assert set(config["target_modules"]) == expected
    weights = load_file(result.directory / ADAPTER_WEIGHTS)
    assert {name.split(".")[-3] for name in weights} == expected  # ...<layer>.lora_A.weight


def test_unscaled_trainings_of_gone_processes_are_cleared(tmp_path) -> None:
    """The ladder's unscaled trainings live in memory: what a process that is gone left on disk
    (a restart, a container whose scratch volume outlived it) is removed; another trainer's stays."""
    import os
    import subprocess
    import sys

    from shared.scratch import clear_gone_processes as clear_unscaled

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folders = [str(os.getpid()), gone.stdout.strip(), str(os.getppid()), "0f26e3a0781953a9b0ee398075bf3c67"]
    for name in folders:
        (tmp_path / name / "adapter").mkdir(parents=True)
    clear_unscaled(tmp_path)
    # another trainer's stays, and so does what is not named by a process id (not ours to remove)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(os.getppid()), "0f26e3a0781953a9b0ee398075bf3c67"])


def test_a_gentler_strength_of_a_continuing_update_scales_the_update_not_what_the_scope_knew(
    trainer: LoraTrainer,
) -> None:
    # Scaling the B matrices of an adapter trained on from its parent scaled every earlier update
    # of the scope with the new one: a 0.5 rung halved what the scope had learned before.
    parent = trainer.train(TrainingJob("scope-v1", FAST, texts=TEXTS))
    keep = trainer.work_dir / "kept-parent"
    shutil.copytree(parent.directory, keep)
    full = trainer.train(TrainingJob("scope-v2", FAST, texts=TEXTS[:2], parent_dir=keep))
    half = trainer.train(TrainingJob("scope-v2-half", FAST.model_copy(update={"adapter_scale": 0.5}), texts=TEXTS[:2],
                                     parent_dir=keep))
    assert half.reused_from == "scope-v2"
    p, f, h = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (keep, full.directory, half.directory))
    assert p.keys() == f.keys() == h.keys()
    for key in p:  # every matrix halfway from the parent's to the training's
        expected = p[key].float() + 0.5 * (f[key].float() - p[key].float())
        assert torch.allclose(h[key].float(), expected, rtol=1e-2, atol=1e-6), key
    moved = [k for k in p if not torch.equal(p[k], f[k])]
    assert moved and any(".lora_A." in k for k in moved)


def test_scaling_from_a_parent_that_does_not_match_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from shared.lora import scale_update

    child, other = tmp_path / "child", tmp_path / "other"
    for folder, rank in ((child, 4), (other, 8)):
        folder.mkdir()
        save_file({"m.q.lora_A.weight": torch.ones(rank, 6), "m.q.lora_B.weight": torch.ones(6, rank)},
                  str(folder / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="was not trained on from .* 2 of its 2 LoRA matrices have no match"):
        scale_update(child, 0.5, other)
    scale_update(child, 0.5, child)  # trained on from itself: the update is nothing, nothing moves
    assert torch.equal(load_file(str(child / ADAPTER_WEIGHTS))["m.q.lora_B.weight"], torch.ones(6, 4))


def test_what_a_killed_trainer_left_before_its_upload_is_removed_at_start(tiny_model, tmp_path) -> None:
    """A trainer killed between saving an adapter and uploading it (out of memory, restarted as
    hung) left the adapter in the pod's size-limited /tmp; the next one removes it as it starts."""
    left = tmp_path / "trained" / "999999999" / "adapter-x"
    left.mkdir(parents=True)
    (left / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    trainer = LoraTrainer(tiny_model, tmp_path)
    assert not left.parent.exists() and trainer.outputs.parent == tmp_path / "trained"
