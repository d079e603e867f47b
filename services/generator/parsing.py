"""Completions to training sequences and training directives, the way SEAL does.

* *implications* and *rewrite*: one sequence per non-empty line.
* *self-QA*, *correction*: one sequence per question-answer pair / line.
* *preference*: one sequence per written ``User:``/``Assistant:`` example.

Each written piece becomes the sequence ``"<title>\\n<piece>"`` (the title as
prefix, as SEAL prefixes each sequence with the SQuAD title), and the raw
passage is added as one more sequence. Bullets and numbering are stripped;
a heading line ("Implications:") is not a sequence.

Proposed directives are the last JSON object in the completion; they are
merged over the scope's defaults and clamped to
:attr:`TrainingDirectives.BOUNDS`; anything unparseable falls back to the
defaults.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shared.events import TrainingDirectives

BULLET = re.compile(r"^\s*(?:[-*•·–>]+|\(?\d{1,3}[.):]|\d{1,3}\s*-|[a-zA-Z][.)](?=\s))\s*")
HEADING = re.compile(
    r"(?i)^(?:passage|implications?|rewrites?|rewritten(?: passage)?|questions?(?: and answers)?|"
    r"answers?|examples?|title|here are[^:]*|sure[^:]*)\s*:?\s*$"
)
QA_PAIR = re.compile(
    r"(?:^|\n)[ \t>*#-]*(?:question|q)[ \t]*\d*[ \t]*[:.)][ \t]*(?P<q>[^\n]+?)\s*\n?[ \t>*#-]*"
    r"(?:answer|a)[ \t]*\d*[ \t]*:[ \t]*(?P<a>[^\n]+)",
    re.IGNORECASE,
)
EXAMPLE_PAIR = re.compile(
    r"(?:^|\n)[ \t*#-]*user[ \t]*\d*[ \t]*:[ \t]*(?P<q>.+?)\s*\n[ \t*#-]*assistant[ \t]*\d*[ \t]*:[ \t]*"
    r"(?P<a>.+?)(?=\n[ \t*#-]*user[ \t]*\d*[ \t]*:|\n\s*\n|\Z)",
    re.IGNORECASE | re.DOTALL,
)
JSON_OBJECT = re.compile(r"\{[^{}]{0,600}\}")


@dataclass(frozen=True)
class Piece:
    """One unit the model wrote: a line, a QA pair or an example.

    ``answer`` is set for question-answer pairs: it must be grounded strictly.
    """

    text: str
    answer: str | None = None


@dataclass(frozen=True)
class ParsedCompletion:
    pieces: tuple[Piece, ...]
    proposed_directives: dict[str, Any] | None


def parse_completion(fmt: str, completion: str, *, read_directives: bool = False) -> ParsedCompletion:
    """The pieces of a completion in ``fmt``, and the directives it proposes, if asked to read them."""
    proposed = None
    if read_directives:
        proposed, completion = extract_directives(completion)
    if fmt == "self_qa":
        pieces = [Piece(f"Question: {q}\nAnswer: {a}", answer=a) for q, a in qa_pairs(completion)]
    elif fmt == "preference":
        pieces = [Piece(f"User: {q}\nAssistant: {a}") for q, a in example_pairs(completion)]
    else:
        pieces = [Piece(line) for line in completion_lines(completion)]
    return ParsedCompletion(tuple(pieces), proposed)


def completion_lines(completion: str) -> list[str]:
    lines = []
    for raw in completion.splitlines():
        line = BULLET.sub("", raw).strip().strip('"').strip()
        if line and not HEADING.match(line):
            lines.append(line)
    return lines


def qa_pairs(completion: str) -> list[tuple[str, str]]:
    pairs = []
    for match in QA_PAIR.finditer(completion):
        question, answer = match.group("q").strip(), match.group("a").strip()
        if question and answer:
            pairs.append((question, answer))
    return pairs


def example_pairs(completion: str) -> list[tuple[str, str]]:
    pairs = []
    for match in EXAMPLE_PAIR.finditer(completion):
        prompt, response = match.group("q").strip(), match.group("a").strip()
        if prompt and response:
            pairs.append((prompt, response))
    return pairs


def with_title(title: str | None, text: str) -> str:
    return f"{title}\n{text}" if title else text


# A long passage's pieces each begin with its title: at most this much of it (a title of thousands
# of characters repeated in dozens of pieces made events larger than a message may carry).
PIECE_TITLE_CHARS = 200


def passage_sequences(title: str | None, passage: str, max_chars: int) -> list[str]:
    """The raw passage as one sequence, split at sentence ends only where it is too long."""
    whole = with_title(title, passage)
    if len(whole) <= max_chars:
        return [whole]
    title = title[:PIECE_TITLE_CHARS] if title else title
    budget = max(32, max_chars - len(title or "") - 1)
    chunks: list[str] = []
    current = ""
    for sentence in re.split(r"(?<=[.!?])\s+", passage):
        while len(sentence) > budget:  # a single endless sentence: cut it
            if current:
                chunks.append(current)
                current = ""
            chunks.append(sentence[:budget])
            sentence = sentence[budget:]
        if current and len(current) + 1 + len(sentence) > budget:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        chunks.append(current)
    return [with_title(title, chunk) for chunk in chunks]


def seal_sequences(fmt: str, completion: str, title: str | None, passage: str, max_chars: int = 4000) -> list[str]:
    """SEAL's training sequences for a knowledge self-edit, before validation."""
    pieces = parse_completion(fmt, completion).pieces
    return [with_title(title, p.text) for p in pieces] + passage_sequences(title, passage, max_chars)


# --------------------------------------------------------------------------- directives


def extract_directives(completion: str) -> tuple[dict[str, Any] | None, str]:
    """The last JSON object in the completion (if any parses) and the text without it."""
    for match in reversed(list(JSON_OBJECT.finditer(completion))):
        parsed = _loads(match.group())
        if isinstance(parsed, dict):
            return parsed, (completion[: match.start()] + completion[match.end() :]).strip()
    return None, completion


def _loads(text: str) -> Any:
    for candidate in (text, text.replace("'", '"')):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def clamp_directives(
    proposed: dict[str, Any] | None, defaults: TrainingDirectives, sequence_count: int
) -> TrainingDirectives:
    """Defaults overlaid with what was proposed, every value pulled into its bounds.

    ``use_sequences`` keeps only indices of sequences that exist; none left means all.
    """
    # ``clamped`` sets only what it could use; everything else keeps the scope's default.
    usable = TrainingDirectives.clamped(proposed or {})
    update = {name: getattr(usable, name) for name in usable.model_fields_set}
    chosen = update.get("use_sequences", defaults.use_sequences)
    if chosen is not None:
        chosen = tuple(i for i in chosen if i < sequence_count) or None
    update["use_sequences"] = chosen
    return TrainingDirectives.model_validate({**defaults.model_dump(), **update})
