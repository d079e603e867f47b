"""SEAL's inner loop: fine-tune the active LoRA adapter on planned steps.

Read top to bottom: :func:`fit` runs AdamW (no weight decay) with a linear
decay of the learning rate to zero and gradient clipping at 1.0 (the
Hugging Face Trainer's defaults, so the SEAL recipe's hyperparameters mean
the same thing here), over steps from :func:`examples.plan_epoch`. The loss of
a step is the mean over its real target tokens; a step split into several
forward passes weights each pass by its share of the step's targets.

An ``anchor`` (see :class:`services.trainer.rehearsal.KlAnchor`) adds its
own back-propagated term to every step before the gradient is clipped; its
values are kept apart from the loss on the examples (``anchor_curve``).

Any non-finite loss, gradient or weight stops training with
:class:`NonFiniteTraining`, and a set ``stop`` event (the process is shutting
down) stops it before the next step with :class:`TrainingInterrupted`;
nothing half-trained leaves this module.

:func:`mean_token_loss` is the one measure of "how well does the model know
these examples" used by the tests and the benchmark alike.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.trainer.examples import IGNORE, Example, Step
from shared.shutdown import Interrupted

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


class TrainingInterrupted(Interrupted):
    """Training was asked to stop before it finished (the process is shutting down)."""


class NonFiniteTraining(Exception):
    """The loss or the weights stopped being finite numbers."""


@dataclass
class TrainingRun:
    loss_curve: list[float] = field(default_factory=list)  # one value per optimizer step
    epoch_losses: list[float] = field(default_factory=list)  # target-weighted mean per epoch
    anchor_curve: list[float] = field(default_factory=list)  # the anchor's term per step (none: empty)
    steps: int = 0
    target_tokens: int = 0  # tokens the loss was taken on, all epochs
    processed_tokens: int = 0  # tokens that went through the model, padding included
    seconds: float = 0.0

    @property
    def initial_loss(self) -> float | None:
        return self.loss_curve[0] if self.loss_curve else None

    @property
    def final_loss(self) -> float | None:
        return self.epoch_losses[-1] if self.epoch_losses else None


def fit(
    model: torch.nn.Module,
    parameters: Sequence[torch.nn.Parameter],
    epochs: Sequence[Sequence[Step]],
    *,
    learning_rate: float,
    device: torch.device,
    on_epoch: Callable[[int, int, float], None] | None = None,
    pause_s: float = 0.0,
    anchor: Callable[[torch.nn.Module, int], float] | None = None,
    stop: threading.Event | None = None,
) -> TrainingRun:
    """Train ``parameters`` of ``model`` over the planned ``epochs``; returns the run.

    ``stop``: checked before every step; once set, :class:`TrainingInterrupted`."""
    if not parameters:
        raise ValueError("nothing to train: no parameter requires a gradient")
    total = sum(len(steps) for steps in epochs)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / total))
    run = TrainingRun()
    started = time.perf_counter()
    model.train()
    try:
        for epoch, steps in enumerate(epochs, start=1):
            weighted, targets = 0.0, 0
            for step in steps:
                if stop is not None and stop.is_set():
                    raise TrainingInterrupted(f"stopped before step {run.steps + 1} of {total} (epoch {epoch})")
                loss = _step(model, step, device)
                if not math.isfinite(loss):
                    raise NonFiniteTraining(f"loss became {loss} at step {run.steps + 1} (epoch {epoch})")
                if anchor is not None:
                    held = anchor(model, run.steps)
                    if not math.isfinite(held):
                        raise NonFiniteTraining(f"the anchor's term became {held} at step {run.steps + 1} (epoch {epoch})")
                    run.anchor_curve.append(held)
                norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
                if not torch.isfinite(norm):
                    raise NonFiniteTraining(f"gradient norm became {float(norm)} at step {run.steps + 1} (epoch {epoch})")
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                run.steps += 1
                run.loss_curve.append(loss)
                run.target_tokens += step.targets
                run.processed_tokens += step.tokens
                weighted += loss * step.targets
                targets += step.targets
                if pause_s:
                    time.sleep(pause_s)
            run.epoch_losses.append(weighted / max(targets, 1))
            if on_epoch is not None:
                on_epoch(epoch, len(epochs), run.epoch_losses[-1])
        check_finite(parameters)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    run.seconds = time.perf_counter() - started
    return run


def _step(model: torch.nn.Module, step: Step, device: torch.device) -> float:
    """Forward and backward every pass of one step; returns the step's mean target loss."""
    total_targets = step.targets
    loss_value = 0.0
    for rows in step.passes:
        if not rows.targets:
            continue
        rows = rows.to(device)
        out = model(
            input_ids=rows.input_ids, position_ids=rows.position_ids, labels=rows.labels, use_cache=False
        )
        share = rows.targets / total_targets
        (out.loss * share).backward()
        loss_value += float(out.loss.detach()) * share
    return loss_value


def check_finite(parameters: Sequence[torch.nn.Parameter]) -> None:
    for p in parameters:
        if not torch.isfinite(p.detach()).all():
            raise NonFiniteTraining("a trained weight is not a finite number")


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, examples: Sequence[Example], device: torch.device) -> float:
    """Mean cross-entropy over the target tokens of ``examples``, one example at a time."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for example in examples:
            ids = torch.tensor([example.input_ids], device=device)
            labels = torch.tensor([example.labels], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            targets = labels[0, 1:]
            keep = targets != IGNORE
            if keep.any():
                losses = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
                total += float(losses)
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
