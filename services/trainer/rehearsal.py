"""Rehearsal: hold the model to the base's own behaviour on unrelated prompts while it learns.

Training a small model hard enough to remember a passage (SEAL's lr 1e-3,
10 epochs) also teaches it to answer everything the way it answers the new
facts: in our measurements core-knowledge accuracy fell from 98/107 to ~20
after training on five question-answer pairs, and still to ~78 with the
base's greedy answers to unrelated prompts mixed into the training data.

What holds it: a second term in every optimizer step, :class:`KlAnchor`.
For a few prompts unrelated to the update (``data/rehearsal.txt``: everyday
instructions and general-knowledge questions, none of them a question of the
evaluator's core set) with the base model's own greedy answer, it takes the
KL divergence from the bare base's next-token distribution to the adapted
model's, at every position of the answer, and adds it (weighted) to the
loss. Matching whole distributions, not just the greedy token, keeps far
more: on two dev passages, 6/10 questions learned either way, core 94/107
kept with the KL term against 78 with the answers as plain training data
(base 98; bench/RESULTS.md).

A job takes a seeded sample of ``count`` prompts; their answers are
generated with the adapters disabled (the bare base), greedily, the first
time any job samples them, and kept for the life of the process, so they are
the same for every job.
"""

from __future__ import annotations

import logging
import random
import threading
from importlib import resources
from pathlib import Path

import torch

from services.trainer import examples as ex
from shared.generation import chat_prompt, generate
from shared.lora import AdapterHost
from shared.models import LoadedModel

log = logging.getLogger(__name__)

MAX_ANSWER_TOKENS = 32  # the start of an answer is what decides it; more only costs time


def packaged_prompts() -> tuple[str, ...]:
    text = resources.files("services.trainer").joinpath("data/rehearsal.txt").read_text(encoding="utf-8")
    return read_prompts(text)


def read_prompts(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")))


class Rehearsal:
    """The base model's answers to fixed prompts, each generated the first time a job samples it."""

    def __init__(self, prompts: tuple[str, ...], count: int):
        self.prompts = prompts
        self.count = count
        self._answers: dict[str, str] = {}  # prompt -> the bare base's greedy answer ("" if none)
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path | None, count: int) -> "Rehearsal":
        prompts = read_prompts(path.read_text(encoding="utf-8")) if path else packaged_prompts()
        return cls(prompts, count)

    def answers(
        self,
        lm: LoadedModel,
        host: AdapterHost | None = None,
        prompts: tuple[str, ...] | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[tuple[str, str], ...]:
        """(prompt, answer) for each of ``prompts`` (default: all) the bare base answers with something.

        ``host``: the adapters over ``lm``'s model, disabled while the answers are generated.
        ``stop``: see :func:`shared.generation.generate` (answers not generated are not kept).
        """
        wanted = list(dict.fromkeys(self.prompts if prompts is None else prompts))
        with self._lock:
            missing = [p for p in wanted if p not in self._answers]
            if missing:
                chats = [chat_prompt(lm, p) for p in missing]
                if host is None:
                    outputs = generate(lm, chats, max_new_tokens=MAX_ANSWER_TOKENS, stop=stop)
                else:
                    with host.base_only():
                        outputs = generate(lm, chats, max_new_tokens=MAX_ANSWER_TOKENS, stop=stop)
                self._answers.update((p, out[0].strip()) for p, out in zip(missing, outputs, strict=True))
                log.info("rehearsal: %d more answers of the base model (%d known)", len(missing), len(self._answers))
            return tuple((p, self._answers[p]) for p in wanted if self._answers[p])

    def sample(
        self, lm: LoadedModel, seed: int, host: AdapterHost | None = None, stop: threading.Event | None = None
    ) -> tuple[tuple[str, str], ...]:
        """A seeded sample of ``count`` prompts with their answers (fewer where the base says nothing)."""
        if not self.count:
            return ()
        chosen = self.prompts if len(self.prompts) <= self.count else tuple(random.Random(seed).sample(self.prompts, self.count))
        return self.answers(lm, host, chosen, stop)


class KlAnchor:
    """Per optimizer step: ``weight`` x KL(bare base || adapted model) on the answers of ``batch`` examples.

    The examples are taken in turn (step ``i`` takes examples ``i*batch ...``,
    wrapping round); each call runs the adapted model over them,
    back-propagates the weighted divergence (mean over answer positions) into
    the adapter, and returns the divergence.

    The bare base's side never changes, so it is computed once per example:
    the base's last hidden states at the answer positions (at most 33 vectors
    of the hidden size an example: 76 KB for SmolLM2 in fp32), from which its
    logits are one projection away. A step then runs one forward and backward
    pass instead of two forwards and a backward, and both sides project to the
    vocabulary only at answer positions: on a CPU a step takes about 40% less
    time than running the base every step over one packed row
    (``bench/anchor.py``, bench/RESULTS.md "Trainer"). Every pass that runs
    the base checks that its logits are the projection of the hidden states it
    keeps; for a model where they are not (a soft cap, a scale) nothing is
    kept, and the base runs every step.
    """

    def __init__(
        self,
        host: AdapterHost,
        examples: list[ex.Example],
        *,
        weight: float,
        batch: int,
        pad_id: int,
        device: torch.device,
        pass_tokens: int = 8192,
        row_tokens: int = 0,
        cache_reference: bool = True,
    ):
        """``row_tokens``: how long a packed row of examples may get (0: a row per example);
        ``cache_reference``: keep the base's side (False: run the base every step, as
        ``bench/anchor.py`` compares)."""
        if not examples:
            raise ValueError("an anchor needs at least one example")
        self.host = host
        self.examples = examples
        self.weight = weight
        self.batch = max(1, min(batch, len(examples)))
        self.pad_id = pad_id
        self.device = device
        self.pass_tokens = pass_tokens
        self.row_tokens = row_tokens
        # Example tokens -> the base's last hidden states at its answer positions (None: nothing
        # is cached, the base runs every step).
        self._reference: dict[tuple[int, ...], torch.Tensor] | None = {} if cache_reference else None

    def __call__(self, model: torch.nn.Module, step: int) -> float:
        """Back-propagate step ``step``'s weighted term; returns its divergence."""
        start = step * self.batch
        chosen = [self.examples[(start + i) % len(self.examples)] for i in range(self.batch)]
        value = 0.0
        for rows, share in self._passes(chosen):
            kl = self._divergence(model, rows)
            (self.weight * kl * share).backward()
            value += float(kl.detach()) * share
        return value

    @torch.no_grad()
    def divergence(self, model: torch.nn.Module) -> float:
        """Mean KL(bare base || ``model``) over the answer positions of all the examples."""
        was_training = model.training
        model.eval()
        try:
            return sum(float(self._divergence(model, rows)) * share for rows, share in self._passes(self.examples))
        finally:
            model.train(was_training)

    def _passes(self, chosen: list[ex.Example]) -> list[tuple[ex.Rows, float]]:
        # A row per example by default: rehearsal examples are short and alike in length, so
        # padding them costs less than attention across one long packed row (on a CPU, about 20%
        # of a step).
        passes = ex.plan_epoch(
            chosen, batch_size=len(chosen), row_tokens=self.row_tokens, pass_tokens=self.pass_tokens,
            pad_id=self.pad_id, seed=0,
        )[0].passes
        total = sum(p.targets for p in passes)
        return [(rows.to(self.device), rows.targets / total) for rows in passes if rows.targets]

    def _divergence(self, model: torch.nn.Module, rows: ex.Rows) -> torch.Tensor:
        # Position t predicts token t+1: keep the positions whose next token is an answer token.
        keep = torch.zeros_like(rows.labels, dtype=torch.bool)
        keep[:, :-1] = rows.labels[:, 1:] != ex.IGNORE
        reference = torch.log_softmax(self._reference_logits(rows, keep).float(), dim=-1)
        logits = model(
            input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False, logits_to_keep=keep
        ).logits
        adapted = torch.log_softmax(_kept(logits, keep).float(), dim=-1)
        return torch.nn.functional.kl_div(adapted, reference, log_target=True, reduction="batchmean")

    @torch.no_grad()
    def _reference_logits(self, rows: ex.Rows, keep: torch.Tensor) -> torch.Tensor:
        """The bare base's logits at the ``keep`` positions of ``rows``, in row-major order."""
        segments = _segments(rows, keep) if self._reference is not None else []
        with self.host.base_only() as base:
            head = base.get_output_embeddings()
            if self._reference is not None and all(tokens in self._reference for tokens, _ in segments):
                return head(torch.cat([self._reference[tokens] for tokens, _ in segments]))
            seen: list[torch.Tensor] = []
            hook = head.register_forward_hook(lambda _module, args, _out: seen.append(args[0].detach()) if args else None)
            try:
                logits = base(
                    input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False, logits_to_keep=keep
                ).logits
            finally:
                hook.remove()
            logits = _kept(logits, keep)
            if self._reference is not None:
                hidden = seen[-1].reshape(-1, seen[-1].shape[-1]) if seen else None
                if hidden is None or hidden.shape[0] != logits.shape[0] or not torch.equal(head(hidden), logits):
                    log.warning(
                        "rehearsal: this model's logits are not the projection of its last hidden states; the base "
                        "model runs at every step of the anchor (slower, the same result)"
                    )
                    self._reference = None
                else:
                    for (tokens, count), part in zip(segments, hidden.split([n for _, n in segments]), strict=True):
                        self._reference.setdefault(tokens, part.clone())
            return logits


def _kept(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The logits at the ``keep`` positions, one row each in row-major order, whether the model
    applied ``logits_to_keep`` (rows already) or ignored it (logits at every position)."""
    if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
        return logits
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:
        return logits[keep]
    raise ValueError(f"logits of shape {tuple(logits.shape)} for {int(keep.sum())} kept positions of {tuple(keep.shape)}")


def _segments(rows: ex.Rows, keep: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
    """The packed examples of ``rows`` in row-major order: (their tokens, their kept positions).

    An example starts where its position ids restart at 0; padding has no kept position and is
    left out.
    """
    found = []
    for ids, positions, kept in zip(rows.input_ids.tolist(), rows.position_ids.tolist(), keep.tolist(), strict=True):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for begin, end in zip(starts, starts[1:]):
            count = sum(kept[begin:end])
            if count:
                found.append((tuple(ids[begin:end]), count))
    return found
