"""Training examples and how they are laid out in batches.

Two kinds of example, one layout:

* :func:`text_examples`: a self-edit's sequences. Every real token is a
  target (the sequence, then end-of-text).
* :func:`completion_examples`: (prompt, completion) pairs for the generator's
  own policy adapter. Only the completion is a target; the prompt is context.

:func:`plan_epoch` turns examples into optimizer steps. The examples of one
step are *packed*: placed end to end in as few rows as fit, each with its own
position ids, so attention never crosses from one example into another
(transformers builds a block-diagonal mask from the position-id resets), and
rows are padded only to the longest row of their step. Padding and the first
token of each packed example are never targets (``IGNORE``), so the loss is
the mean over real tokens only, never over padding.

:func:`split_question_answers` decides which of a self-edit's sequences are
chat turns (a "Question:/Answer:" pair) and which are learned whole;
:func:`replay_schedule` picks the lineage's earlier examples for each epoch, and
:func:`bounded_lineage` keeps what a manifest records of the lineage for replay
within a bound, however long a scope lives.

Compare the SEAL reference recipe, which pads every sequence to 2048 tokens
and keeps the padding in the labels: with ~100-token sequences about 95% of
its loss positions are padding.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """Token ids and their targets (``IGNORE`` where nothing is learned)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> int:
        """Tokens the loss is taken on (the first token is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def text_examples(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> list[Example]:
    """One example per text: all of it (and end-of-text) is learned."""
    eos = _eos_id(tokenizer)
    examples = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"]) + [eos]
        truncated = len(ids) > max_tokens
        ids = ids[:max_tokens]
        if len(ids) >= 2:
            examples.append(Example(tuple(ids), tuple(ids), truncated))
    return examples


def completion_examples(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_tokens: int
) -> list[Example]:
    """One example per (prompt, completion); only the completion is learned.

    ``prompt`` is the full text the model sees before it answers (for a chat
    model, its chat template up to the assistant turn). Examples whose
    completion is cut away entirely by ``max_tokens`` are dropped.
    """
    eos = _eos_id(tokenizer)
    examples = []
    for prompt, completion in pairs:
        # The prompt is already formatted (chat template): tokenized as generation tokenizes it.
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        answer_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eos]
        ids = prompt_ids + answer_ids
        labels = [IGNORE] * len(prompt_ids) + answer_ids
        truncated = len(ids) > max_tokens
        example = Example(tuple(ids[:max_tokens]), tuple(labels[:max_tokens]), truncated)
        if example.targets:
            examples.append(example)
    return examples


@dataclass
class Rows:
    """One forward pass: packed rows padded to the same length."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "Rows":
        return Rows(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device))


@dataclass
class Step:
    """One optimizer step: its examples, as one or more forward passes."""

    passes: list[Rows]

    @property
    def targets(self) -> int:
        return sum(p.targets for p in self.passes)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.passes)


def plan_epoch(
    examples: Sequence[Example],
    *,
    batch_size: int,
    row_tokens: int,
    pass_tokens: int,
    pad_id: int,
    seed: int,
) -> list[Step]:
    """Shuffle (seeded), group ``batch_size`` examples per step, pack each group.

    ``row_tokens`` caps one packed row (an example longer than that gets a row
    of its own); ``pass_tokens`` caps the padded size of one forward pass, so
    a large step runs as several passes whose gradients add up.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    steps = []
    for start in range(0, len(order), batch_size):
        group = [examples[i] for i in order[start : start + batch_size]]
        rows = pack_rows(group, row_tokens)
        steps.append(Step(_passes(rows, pass_tokens, pad_id)))
    return steps


def replay_schedule(groups: Sequence[Sequence[T]], per_epoch: int, epochs: int, seed: int) -> list[list[T]]:
    """Per epoch, ``per_epoch`` items shared evenly among ``groups`` (the remainder, or with more
    groups than the budget the groups themselves, taking turns from epoch to epoch; a group with
    fewer items than its share gives the rest to the others).

    Each group's items are taken in a seeded shuffled order that wraps round, so over the
    epochs every item of every group comes up as evenly as the budget allows. No epoch takes
    more than all the items there are.
    """
    groups = [list(g) for g in groups if g]
    if not groups or per_epoch <= 0:
        return [[] for _ in range(epochs)]
    rng = random.Random(seed)
    orders = [rng.sample(g, len(g)) for g in groups]
    cursors = [0] * len(groups)
    budget = min(per_epoch, sum(len(g) for g in groups))
    first = rng.randrange(len(groups))
    schedule = []
    for epoch in range(epochs):
        shares = [0] * len(groups)
        # Each epoch starts where the last one's budget ended: with more groups than the budget,
        # the epochs take turns over all of them.
        turn = (first + epoch * budget) % len(groups)
        for _ in range(budget):
            while shares[turn] >= len(groups[turn]):
                turn = (turn + 1) % len(groups)
            shares[turn] += 1
            turn = (turn + 1) % len(groups)
        taken: list[T] = []
        for g, share in enumerate(shares):
            order = orders[g]
            taken += [order[(cursors[g] + i) % len(order)] for i in range(share)]
            cursors[g] = (cursors[g] + share) % len(order)
        schedule.append(taken)
    return schedule


def pack_rows(examples: Sequence[Example], row_tokens: int) -> list[list[Example]]:
    """First-fit decreasing: longest examples first, each into the first row it fits."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(example) <= free:
                rows[i].append(example)
                room[i] -= len(example)
                break
        else:
            rows.append([example])
            room.append(max(row_tokens, len(example)) - len(example))
    return rows


def _passes(rows: list[list[Example]], pass_tokens: int, pad_id: int) -> list[Rows]:
    rows = sorted(rows, key=_row_length, reverse=True)
    passes, current = [], []
    for row in rows:
        width = _row_length(current[0]) if current else _row_length(row)
        if current and width * (len(current) + 1) > pass_tokens:
            passes.append(_collate(current, pad_id))
            current = []
        current.append(row)
    if current:
        passes.append(_collate(current, pad_id))
    return passes


def _row_length(row: list[Example]) -> int:
    return sum(len(e) for e in row)


def _collate(rows: list[list[Example]], pad_id: int) -> Rows:
    width = max(_row_length(r) for r in rows)
    ids, positions, labels = [], [], []
    for row in rows:
        row_ids: list[int] = []
        row_pos: list[int] = []
        row_labels: list[int] = []
        for example in row:
            row_ids += example.input_ids
            row_pos += range(len(example))
            # The first token of a packed example is not predicted from the one before it.
            row_labels += (IGNORE,) + example.labels[1:]
        pad = width - len(row_ids)
        # Padding forms its own block (positions restart), so no real token attends to it.
        ids.append(row_ids + [pad_id] * pad)
        positions.append(row_pos + list(range(pad)))
        labels.append(row_labels + [IGNORE] * pad)
    return Rows(torch.tensor(ids), torch.tensor(positions), torch.tensor(labels))


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token")
    return int(eos)


QUESTION_ANSWER = re.compile(r"\AQuestion:[ \t]*(?P<question>[^\n]*\S)[ \t]*\nAnswer:[ \t]*(?P<answer>.*\S)\s*\Z", re.S)


def split_question_answers(sequences: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(texts, pairs): a "Question: ...\nAnswer: ..." sequence becomes a chat turn.

    Such a sequence (SEAL's self-QA format, and the generator's grounded
    question-answer pairs) is trained as the model is later asked: the
    question alone as the user's turn, only the answer learned. Everything
    else is learned whole, as text.
    """
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    for sequence in sequences:
        match = QUESTION_ANSWER.match(sequence)
        if match:
            pairs.append((match["question"], match["answer"]))
        else:
            texts.append(sequence)
    return tuple(texts), tuple(pairs)


def replayed_sequences(sequences: Sequence[str]) -> list[str]:
    """What replay uses of one update: its question-answer pairs where it has any, else all of it."""
    pairs = [s for s in sequences if QUESTION_ANSWER.match(s)]
    return pairs or list(sequences)


def without_superseded(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each group (oldest first) without the question-answer pairs a newer group asks again: a
    correction's new answer replaces the old one, which replay would otherwise go on teaching
    next to it in every later update (the evaluator already takes the newest answer as right)."""
    asked: set[str] = set()
    kept: list[list[str]] = []
    for group in reversed(groups):
        mine = [s for s in group if not ((m := QUESTION_ANSWER.match(s)) and _asked(m["question"]) in asked)]
        asked |= {_asked(m["question"]) for s in group if (m := QUESTION_ANSWER.match(s))}
        kept.append(mine)
    return kept[::-1]


def _asked(question: str) -> str:
    """A question as a key: the same however it is cased, spaced or ended ("?"), and nothing more
    (answer normalisation made "What is C++ used for?" and "What is C used for?" one question)."""
    return " ".join(unicodedata.normalize("NFKC", question).casefold().split()).rstrip(" ?.!")


def bounded_lineage(groups: Sequence[Sequence[str]], limit: int) -> list[list[str]]:
    """Each update's sequences as replay uses them (:func:`replayed_sequences`), at most ``limit``
    in all, so that a manifest, which records the whole lineage, stays bounded.

    Over the limit, every update gets the same share (an update with fewer gives the rest to the
    others; what division leaves over goes to the newest), taken evenly spread over its
    sequences; with more updates than the limit, the oldest keep none (their ids stay in the
    record). Applied update after update, each keeps a spread-out subset of what it kept before.
    """
    kept = [replayed_sequences(g) for g in groups]
    if sum(len(g) for g in kept) <= limit:
        return kept
    shares = [0] * len(kept)
    left, waiting = max(0, limit), len(kept)
    for i in sorted(range(len(kept)), key=lambda i: (len(kept[i]), i)):
        shares[i] = min(len(kept[i]), left // waiting)
        left -= shares[i]
        waiting -= 1
    for i in reversed(range(len(kept))):
        extra = min(len(kept[i]) - shares[i], left)
        shares[i] += extra
        left -= extra
    return [[g[k * len(g) // n] for k in range(n)] if n else [] for g, n in zip(kept, shares)]


def selected_sequences(sequences: Sequence[str], use: Sequence[int] | None) -> tuple[str, ...]:
    """The sequences a directive's ``use_sequences`` picks (all when None; bad indices ignored)."""
    if use is None:
        return tuple(sequences)
    return tuple(sequences[i] for i in dict.fromkeys(use) if 0 <= i < len(sequences))
