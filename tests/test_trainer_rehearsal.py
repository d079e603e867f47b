"""Trainer: rehearsal, the base model's own answers a rehearsing update is held to, and the KL
anchor that holds it (on the tiny model, the real one where its answers matter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer_training import FAST, TEXTS

from services.trainer.examples import IGNORE
from services.trainer.lora_training import LoraTrainer, TrainingJob


def test_a_rehearsing_job_is_held_to_the_base_models_own_answers(default_model, tmp_path) -> None:
    from services.trainer.lora_training import Anchoring
    from services.trainer.rehearsal import Rehearsal, packaged_prompts

    rehearsal = Rehearsal(("Say hello.", "Name a colour.", "Count to three."), count=2)
    trainer = LoraTrainer(default_model, tmp_path, rehearsal=rehearsal)
    plain = TrainingJob("plain", FAST, texts=TEXTS[:1])
    rehearsing = TrainingJob("rehearsing", FAST, texts=TEXTS[:1], rehearse=True)
    assert trainer.rehearsal_examples(plain) == []
    held = trainer.rehearsal_examples(rehearsing)
    assert len(held) == 2  # two of the three prompts, sampled by the seed
    assert len(trainer.examples_for(rehearsing)) == 1  # the answers are held to, not trained as data
    assert len(rehearsal._answers) == 2  # only what was sampled has been generated
    answers = rehearsal.answers(default_model)
    assert answers == rehearsal.answers(default_model) and len(rehearsal._answers) == 3  # each generated once
    assert len(answers) == 3 and all(prompt in rehearsal.prompts and answer for prompt, answer in answers)
    assert rehearsal.sample(default_model, seed=1) == rehearsal.sample(default_model, seed=1)
    assert LoraTrainer(default_model, tmp_path, rehearsal=rehearsal, anchoring=Anchoring(weight=0)).rehearsal_examples(rehearsing) == []
    assert len(packaged_prompts()) >= 64


class FixedAnswers:
    """Stands in for the base's generated answers (the tiny model's are noise)."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.prompts, self.count = tuple(p for p, _ in pairs), len(pairs)

    def sample(self, lm, seed, host=None, stop=None):
        return self.pairs


def test_the_kl_anchor_holds_the_model_near_the_base_on_the_rehearsal_answers(tiny_model, tmp_path) -> None:
    from services.trainer.lora_training import Anchoring
    from services.trainer.rehearsal import KlAnchor

    # Answers that share words with the training texts, so that training alone moves them.
    pairs = (("the town of", "green river was founded"), ("the population of", "red city was four"), ("what is the", "capital of blue town"))
    hard = FAST.model_copy(update={"learning_rate": 1e-2, "epochs": 12})
    job = TrainingJob("anchored", hard, texts=TEXTS, rehearse=True)
    trainer = LoraTrainer(tiny_model, tmp_path, rehearsal=FixedAnswers(pairs))
    measure = KlAnchor(trainer.host, trainer.rehearsal_examples(job), weight=1.0, batch=2, pad_id=0, device=tiny_model.device)
    assert measure.divergence(trainer.host.model) == pytest.approx(0.0, abs=1e-6)  # the bare base: nothing moved
    moved = {}
    for weight in (0.0, 5.0):
        trainer.anchoring = Anchoring(weight, 2)
        result = trainer.train(job)
        assert result.rehearsal_examples == (3 if weight else 0)
        assert len(result.run.anchor_curve) == (result.run.steps if weight else 0)
        trainer.host.load("anchored", result.directory)
        try:
            moved[weight] = measure.divergence(trainer.host.model)
        finally:
            trainer.host.remove("anchored")
        if weight:
            # Reported: the anchor's mean over the last epoch (one step per epoch here).
            assert result.rehearsal_kl == pytest.approx(result.run.anchor_curve[-1])
            assert result.run.anchor_curve[0] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA starts at the base
    assert moved[0.0] > 0.01 and moved[5.0] < moved[0.0] / 2, moved
    assert result.rehearsal_kl < moved[0.0] / 2


@pytest.fixture
def moved_anchor(tiny_model, tmp_path):
    """A KlAnchor over five rehearsal answers of different lengths, and a LoRA moved off the base
    (taken off the shared tiny model again afterwards)."""
    from services.trainer.lora_training import lora_config
    from services.trainer.rehearsal import KlAnchor

    pairs = (("the town of", "green river"), ("the population of", "red city was four thousand"), ("what is", "blue"),
             ("where is the market", "by the river in the old town"), ("who built it", "the duke"))
    trainer = LoraTrainer(tiny_model, tmp_path, rehearsal=FixedAnswers(pairs))
    examples = trainer.rehearsal_examples(TrainingJob("a", FAST, texts=TEXTS, rehearse=True))
    trainer.host.add_fresh("moved", lora_config(tiny_model.model, rank=8, alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, weight in trainer.host.model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.05)

    def anchor(**options) -> KlAnchor:
        return KlAnchor(trainer.host, examples, weight=1.0, batch=2, pad_id=0, device=tiny_model.device, **options)

    try:
        yield trainer, anchor
    finally:
        trainer.host.remove("moved")


def _divergence_from_full_logits(host, model, anchor, step: int) -> float:
    """Step ``step``'s divergence the plain way: logits at every position of both models, then
    the answer positions picked out (as the anchor did before it kept anything)."""
    start = step * anchor.batch
    chosen = [anchor.examples[(start + i) % len(anchor.examples)] for i in range(anchor.batch)]
    total = 0.0
    with torch.no_grad():
        for rows, share in anchor._passes(chosen):
            keep = torch.zeros_like(rows.labels, dtype=torch.bool)
            keep[:, :-1] = rows.labels[:, 1:] != IGNORE
            with host.base_only() as base:
                # (use_cache=False: with a cache, transformers does not separate packed examples)
                reference = base(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits[keep]
            adapted = model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits[keep]
            kl = torch.nn.functional.kl_div(
                torch.log_softmax(adapted.float(), -1), torch.log_softmax(reference.float(), -1), log_target=True,
                reduction="batchmean",
            )
            total += float(kl) * share
    return total


@pytest.mark.parametrize("row_tokens", [0, 64], ids=["a row per example", "packed rows"])
def test_the_kl_anchor_computes_the_base_side_once_and_gets_the_same_divergence(moved_anchor, row_tokens) -> None:
    trainer, make = moved_anchor
    model = trainer.host.model

    def anchor():
        return make(row_tokens=row_tokens)

    cached = anchor()
    if row_tokens:  # several examples share a row: the cache must split them at their position resets
        assert max(rows.input_ids.shape[0] for rows, _ in cached._passes(cached.examples)) < len(cached.examples)
    # Steps 0-4 take examples (0,1) (2,3) (4,0) (1,2) (3,4): by step 3 every example's base side is kept.
    first_time = [cached(model, step) for step in range(5)]
    assert len(cached._reference) == 5
    for step in range(5, 10):  # the same batches again, every base side from the cache
        fresh = anchor()  # computes the base side anew
        assert cached(model, step) == pytest.approx(fresh(model, step), rel=1e-5)
        assert cached(model, step) == pytest.approx(first_time[step % 5], rel=1e-5)
        assert cached(model, step) == pytest.approx(_divergence_from_full_logits(trainer.host, model, cached, step), rel=1e-5)
    assert cached.divergence(model) == pytest.approx(anchor().divergence(model), rel=1e-5)
    assert cached.divergence(model) > 1e-4  # the LoRA moved: something to measure


def test_the_kl_anchor_runs_the_base_every_step_for_logits_that_are_not_a_projection(moved_anchor) -> None:
    from contextlib import contextmanager

    trainer, anchor = moved_anchor
    model, host = trainer.host.model, trainer.host
    plain = anchor()(model, 0)

    class Capped(torch.nn.Module):  # a soft cap on the base's logits, as some model families have
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

    base_only = host.base_only

    @contextmanager
    def capped_base():
        with base_only() as base:
            yield Capped(base)

    host.base_only = capped_base
    capped = anchor()
    values = [capped(model, step) for step in range(6)]
    assert capped._reference is None  # found out on the first pass: nothing kept
    assert values[0] != pytest.approx(plain, rel=1e-3)  # measured against the capped logits
    assert values[5] == pytest.approx(values[0], rel=1e-5)  # step 5 takes examples (0, 1) again, as step 0 did


def test_the_rehearsal_prompts_are_not_core_questions() -> None:
    from services.trainer.rehearsal import packaged_prompts
    from shared.scoring import normalize_answer

    core = Path(__file__).resolve().parents[1] / "services" / "evaluator" / "data" / "core.jsonl"
    core_questions = {normalize_answer(json.loads(line)["question"]) for line in core.read_text().splitlines() if line}
    assert not core_questions & {normalize_answer(p) for p in packaged_prompts()}
