"""Nothing is trained before it is validated.

For one candidate self-edit, in this order:

1. *Screening* of the whole completion (PII, secrets, prompt injection, the
   scope's blocklist): any finding rejects the candidate.
2. *Bounds*: a written piece shorter or longer than the limits is dropped;
   beyond the count limit the rest is dropped.
3. *Grounding*: each written piece must share content with the feedback.
   A number or a name the feedback never mentions is an invented fact and
   drops the piece; so does too small a share of known content words. The
   answer of a question-answer pair must be grounded entirely.
4. *Duplicates* (after normalising case, spacing and punctuation) are dropped,
   including pieces that merely repeat the passage.

What the feedback itself brings (the raw passage, a correction's statement,
a preference's examples) was screened on arrival and is always kept, so a
knowledge candidate is never empty. A candidate with no sequence left is
rejected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.generator.parsing import Piece, with_title
from services.generator.screening import screen_text

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just me more
    most my myself no nor not now of off on once only or other our ours out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours one ones many much may might must shall still yet well known called named also every would""".split()
)
# Words a question or a label adds without stating anything about the subject.
FRAME_WORDS = frozenset(
    """question answer user assistant year years date name names number kind type colour color roughly
    approximately around about exactly first last long big large small often give given tell""".split()
)
WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*|\d[\d,.]*\d|\d")
SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)$")
# Words a sentence may start with in capitals without naming anything.
FUNCTION_CAPS = frozenset({"i", "it", "its", "the", "a", "an", "this", "that", "these", "those", "there"})


def stem(word: str) -> str:
    word = word.lower().replace("’", "'")
    for possessive in ("'s", "'"):
        if word.endswith(possessive):
            word = word[: -len(possessive)]
    for suffix in ("ing", "ies", "ied", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word


def number_key(token: str) -> str:
    return token.replace(",", "").rstrip(".")


@dataclass(frozen=True)
class Grounding:
    """What the feedback says, to tell grounded pieces from invented ones."""

    stems: frozenset[str]
    numbers: frozenset[str]
    min_overlap: float = 0.6

    @classmethod
    def of(cls, texts: Iterable[str], min_overlap: float = 0.6) -> "Grounding":
        stems, numbers = set(), set()
        for text in texts:
            for token in WORD.findall(text):
                if token[0].isdigit():
                    numbers.add(number_key(token))
                else:
                    stems.add(stem(token))
        return cls(frozenset(stems), frozenset(numbers), min_overlap)

    def problem(self, text: str) -> str | None:
        """Why ``text`` is not grounded in the feedback, or None when it is."""
        content: list[str] = []
        maybe_names = 0
        for match in WORD.finditer(text):
            token = match.group()
            if token[0].isdigit():
                if number_key(token) not in self.numbers:
                    return f"mentions the number {token}, which the feedback does not"
                content.append(number_key(token))
                continue
            key = stem(token)
            ordinary = token.lower() in STOPWORDS or token.lower() in FRAME_WORDS
            if token[0].isupper() and key not in self.stems and not ordinary:
                if not _sentence_start(text, match.start()):
                    return f"names {token!r}, which the feedback does not"
                maybe_names += 1  # an unknown capitalised first word may be a name: it counts twice
            if not ordinary and len(key) > 2:
                content.append(key)
        if not content:
            return "has no content words"
        known = sum(1 for c in content if c in self.stems or c in self.numbers)
        share = known / (len(content) + maybe_names)
        if share < self.min_overlap or known < min(2, len(content)):
            return f"shares too little with the feedback ({known} of {len(content)} content words known)"
        return None

    def answer_problem(self, answer: str) -> str | None:
        """An answer must be made of what the feedback says, all of it."""
        for token in WORD.findall(answer):
            if token[0].isdigit():
                if number_key(token) not in self.numbers:
                    return f"answers with {token}, which the feedback does not mention"
            elif token.lower() not in STOPWORDS and stem(token) not in self.stems:
                return f"answers with {token!r}, which the feedback does not mention"
        return None


def _sentence_start(text: str, position: int) -> bool:
    before = text[:position]
    return bool(SENTENCE_START.search(before)) or before.strip() == ""


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass(frozen=True)
class Limits:
    max_sequences: int = 64
    max_sequence_chars: int = 1500
    min_sequence_chars: int = 12
    # The longest piece a passage is cut into (None: max_sequence_chars), so that each piece fits
    # the training's sequence length (candidates.passage_chunk_chars).
    passage_chars: int | None = None


@dataclass(frozen=True)
class Verdict:
    """The sequences to train on, or the reasons not to; ``notes`` say what was dropped."""

    sequences: tuple[str, ...]
    written: int  # how many of the sequences the model wrote (the rest came with the feedback)
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def accepted(self) -> bool:
        return not self.reasons


def validate_candidate(
    completion: str,
    pieces: Sequence[Piece],
    *,
    grounding: Grounding,
    title: str | None,
    kept: Sequence[str],
    blocklist: Sequence[str],
    limits: Limits,
    must_contain: str | None = None,
) -> Verdict:
    """Validate one candidate. ``kept``: the feedback's own sequences, appended last.

    ``must_contain``: text every written piece must include (a correction's right answer).
    """
    findings = screen_text(completion, blocklist)
    if findings:
        return Verdict((), 0, tuple(f"completion {reason}" for reason in findings))
    notes: list[str] = []
    seen = {normalized(s) for s in kept}
    seen |= {normalized(k.split("\n", 1)[-1]) for k in kept}
    written: list[str] = []
    room = max(0, limits.max_sequences - len(kept))
    for number, piece in enumerate(pieces, start=1):
        problem = _piece_problem(piece, grounding, limits, must_contain, title)
        key = normalized(piece.text)
        if problem is None and key in seen:
            problem = "repeats an earlier sequence"
        if problem is None and len(written) >= room:
            problem = f"is beyond the limit of {limits.max_sequences} sequences"
        if problem is not None:
            notes.append(f"piece {number} {problem}")
            continue
        seen.add(key)
        written.append(with_title(title, piece.text))
    sequences = tuple(written) + tuple(kept)
    if not sequences:
        reason = "no training sequence survived validation"
        if notes:
            reason += f" ({notes[0]}" + (f", and {len(notes) - 1} more" if len(notes) > 1 else "") + ")"
        return Verdict((), 0, (reason,), tuple(notes))
    return Verdict(sequences, len(written), (), tuple(notes))


def _piece_problem(
    piece: Piece, grounding: Grounding, limits: Limits, must_contain: str | None, title: str | None
) -> str | None:
    if len(piece.text) < limits.min_sequence_chars:
        return f"is too short ({len(piece.text)} characters, at least {limits.min_sequence_chars})"
    size = len(with_title(title, piece.text))  # the title travels with it
    if size > limits.max_sequence_chars:
        return f"is too long ({size} characters, at most {limits.max_sequence_chars})"
    if must_contain and normalized(must_contain) not in normalized(piece.text):
        return "does not state the correct answer"
    if piece.answer is not None:
        problem = grounding.answer_problem(piece.answer)
        if problem:
            return problem
    return grounding.problem(piece.text)
