"""Rehearsal: the base model's own answers, trained beside the new facts so it keeps its old ones.

Training a small model hard enough to remember a passage (SEAL's lr 1e-3,
10 epochs) also teaches it to answer everything the way it answers the new
facts: in our measurements core-knowledge accuracy fell from 98/107 to ~20
after training on five question-answer pairs. Mixing in
(prompt, the base model's own greedy answer) pairs for prompts unrelated to
the update (``data/rehearsal.txt``: everyday instructions and general
questions, none of them a question of the evaluator's core set) pulls the
rest of the model's behaviour back towards where it was (self-distillation
as rehearsal), at the cost of a few more training tokens.

The answers are generated once per process, lazily, with no adapter active
(the bare base), greedily, so they are the same for every job; a job takes
a seeded sample of ``count`` of them.
"""

from __future__ import annotations

import logging
import random
import threading
from importlib import resources
from pathlib import Path

from shared.generation import chat_prompt, generate
from shared.models import LoadedModel

log = logging.getLogger(__name__)

MAX_ANSWER_TOKENS = 48


def packaged_prompts() -> tuple[str, ...]:
    text = resources.files("services.trainer").joinpath("data/rehearsal.txt").read_text(encoding="utf-8")
    return read_prompts(text)


def read_prompts(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")))


class Rehearsal:
    """The base model's answers to fixed prompts, computed on first use."""

    def __init__(self, prompts: tuple[str, ...], count: int):
        self.prompts = prompts
        self.count = count
        self._pairs: tuple[tuple[str, str], ...] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path | None, count: int) -> "Rehearsal":
        prompts = read_prompts(path.read_text(encoding="utf-8")) if path else packaged_prompts()
        return cls(prompts, count)

    def answers(self, lm: LoadedModel) -> tuple[tuple[str, str], ...]:
        """(prompt, answer) for every prompt the base answers with something; call with no adapter active."""
        with self._lock:
            if self._pairs is None:
                outputs = generate(lm, [chat_prompt(lm, p) for p in self.prompts], max_new_tokens=MAX_ANSWER_TOKENS)
                self._pairs = tuple((p, out[0].strip()) for p, out in zip(self.prompts, outputs, strict=True) if out[0].strip())
                log.info("rehearsal: %d answers of the base model ready", len(self._pairs))
            return self._pairs

    def sample(self, lm: LoadedModel, seed: int) -> tuple[tuple[str, str], ...]:
        pairs = self.answers(lm) if self.count else ()
        if len(pairs) <= self.count:
            return pairs
        return tuple(random.Random(seed).sample(pairs, self.count))
