"""The one scoring function: closed-book accuracy, as the evaluator, the reward and the benchmarks measure it.

What is measured is what is optimised, so every caller goes through this
module and nothing else decides whether an answer is right.

Asking: :func:`closed_book_answers` puts each question alone into the
model's chat template (no passage; no system prompt of ours, so the
template's default applies, e.g. SmolLM2's), decodes greedily in
batches through :mod:`shared.generation`, and keeps the first line of each
answer (short answers: ``max_new_tokens`` is small).

Grading: :func:`grade` compares an answer with the gold answer and its
aliases after SQuAD-style normalisation (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed; here also thousands
separators dropped, decimal points kept and the number words zero..twenty
written as digits). An answer is *correct* when, for some reference, it is
an exact match or contains the reference as a whole-word span ("The town
was founded in 1387." contains "1387"; "13870" does not). Token F1 (SQuAD's)
is reported beside it.

An optional ``judge`` (for example an LLM behind an OpenAI-compatible
endpoint) is asked only about answers the rules marked wrong, and may only
turn them right; when it has no verdict the rules stand.

Usage::

    from shared.scoring import closed_book_accuracy
    result = closed_book_accuracy(lm, probes)      # probes: .question .answer .aliases
    result.accuracy, result.mean_f1, result.items[0].prediction
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from shared.answers import normalize_answer
from shared.generation import chat_prompt, generate
from shared.models import LoadedModel

__all__ = [
    "ClosedBookResult",
    "Grade",
    "GradedAnswer",
    "Judge",
    "QuestionLike",
    "closed_book_accuracy",
    "closed_book_answers",
    "contains_answer",
    "exact_match",
    "first_line",
    "grade",
    "grade_answers",
    "normalize_answer",
    "probe_set_digest",
    "token_f1",
    "weighted_target",
]

MAX_NEW_TOKENS = 32
BATCH_SIZE = 32

class QuestionLike(Protocol):
    """What a probe must offer: :class:`shared.events.Probe` is one."""

    question: str
    answer: str
    aliases: Sequence[str]


# A judge gets (question, prediction, references) and says right (True),
# wrong (False) or "no verdict" (None).
Judge = Callable[[str, str, Sequence[str]], bool | None]


# ----------------------------------------------------------------- grading


def exact_match(prediction: str, reference: str) -> bool:
    normalized = normalize_answer(reference)
    return bool(normalized) and normalize_answer(prediction) == normalized


def contains_answer(prediction: str, reference: str) -> bool:
    """The reference's normalised words appear, in order and adjacent, in the prediction's."""
    needle = normalize_answer(reference).split()
    hay = normalize_answer(prediction).split()
    if not needle:
        return False
    return any(hay[i : i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 between normalised texts."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Grade:
    correct: bool
    exact: bool
    contained: bool
    f1: float
    matched: str | None = None  # the reference that made it correct


def references(probe: QuestionLike) -> tuple[str, ...]:
    return tuple(dict.fromkeys((probe.answer, *probe.aliases)))


def grade(prediction: str, answer: str, aliases: Iterable[str] = ()) -> Grade:
    """Grade one answer against the gold answer and its aliases (best reference wins)."""
    refs = tuple(dict.fromkeys((answer, *aliases)))
    exact = next((r for r in refs if exact_match(prediction, r)), None)
    contained = next((r for r in refs if contains_answer(prediction, r)), None)
    f1 = max((token_f1(prediction, r) for r in refs), default=0.0)
    matched = exact or contained
    return Grade(matched is not None, exact is not None, contained is not None, f1, matched)


# ------------------------------------------------------------------ asking


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def closed_book_answers(
    lm: LoadedModel,
    questions: Sequence[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    stop: threading.Event | None = None,
) -> list[str]:
    """Greedy short answers to each question asked alone, in the input order.

    Identical questions are asked once; prompts are batched by length. ``stop``:
    see :func:`shared.generation.generate`.
    """
    unique = list(dict.fromkeys(questions))
    prompts = {q: chat_prompt(lm, q) for q in unique}
    ordered = sorted(unique, key=lambda q: (len(prompts[q]), q))
    outputs = generate(
        lm,
        [prompts[q] for q in ordered],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        batch_size=batch_size,
        stop=stop,
    )
    answers = {q: first_line(out[0]) for q, out in zip(ordered, outputs)}
    return [answers[q] for q in questions]


# ---------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class GradedAnswer:
    question: str
    answer: str
    prediction: str
    correct: bool
    exact: bool
    contained: bool
    f1: float
    judged: bool = False  # True when the judge, not the rules, made it correct


@dataclass(frozen=True)
class ClosedBookResult:
    items: tuple[GradedAnswer, ...]

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def correct(self) -> int:
        return sum(item.correct for item in self.items)

    @property
    def accuracy(self) -> float | None:
        """Fraction correct, or None for an empty set (nothing was measured)."""
        return self.correct / self.total if self.items else None

    @property
    def mean_f1(self) -> float | None:
        return sum(item.f1 for item in self.items) / self.total if self.items else None


def rules_only(result: ClosedBookResult) -> ClosedBookResult:
    """``result`` as the rules alone grade it: what the judge turned right is wrong again."""
    return ClosedBookResult(tuple(replace(item, correct=False, judged=False) if item.judged else item for item in result.items))


def grade_answers(
    probes: Sequence[QuestionLike], predictions: Sequence[str], judge: Judge | None = None
) -> ClosedBookResult:
    """Grade given predictions (one per probe); the judge may turn rule-wrong answers right."""
    if len(probes) != len(predictions):
        raise ValueError(f"{len(probes)} probes but {len(predictions)} predictions")
    items = []
    for probe, prediction in zip(probes, predictions):
        result = grade(prediction, probe.answer, probe.aliases)
        judged = False
        if not result.correct and judge is not None and prediction:
            judged = judge(probe.question, prediction, references(probe)) is True
        items.append(
            GradedAnswer(
                question=probe.question,
                answer=probe.answer,
                prediction=prediction,
                correct=result.correct or judged,
                exact=result.exact,
                contained=result.contained,
                f1=result.f1,
                judged=judged,
            )
        )
    return ClosedBookResult(tuple(items))


def closed_book_accuracy(
    lm: LoadedModel,
    probes: Sequence[QuestionLike],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    judge: Judge | None = None,
) -> ClosedBookResult:
    """Ask every probe closed-book and grade it: THE measure of what a model knows."""
    if not probes:
        return ClosedBookResult(())
    predictions = closed_book_answers(
        lm, [p.question for p in probes], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return grade_answers(probes, predictions, judge)


def weighted_target(
    product: float | None, self_generated: float | None, product_weight: float = 2.0
) -> float | None:
    """One target score from the product's probes and self-generated ones.

    The product's probes are the ground truth the product asked for, so their
    accuracy weighs ``product_weight`` times as much as that of the probes the
    model wrote for itself, whatever the counts. A missing side is left out.
    """
    parts = [(s, w) for s, w in ((product, product_weight), (self_generated, 1.0)) if s is not None]
    if not parts:
        return None
    return sum(s * w for s, w in parts) / sum(w for _, w in parts)


def probe_set_digest(probes: Iterable[QuestionLike], **settings: object) -> str:
    """A stable digest of a probe set and the scoring settings it was scored under."""
    rows = [[p.question, p.answer, sorted(p.aliases)] for p in probes]
    payload = json.dumps({"probes": rows, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
