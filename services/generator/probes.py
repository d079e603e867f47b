"""Probe questions written from the passage when the product sends none.

The evaluator's reward is computed on these, so they must be answerable from
the passage and only from it. A 135M model prompted to write questions
invents answers; this module instead extracts them deterministically:

* the answer is a span of the passage: a year, a number, or a name
  (a run of capitalised words);
* the question is the sentence with that span replaced by a question phrase
  ("in what year", "which merchant", "how many kilometres"), the sentence's
  leading pronoun replaced by the subject, and the subject named when the
  sentence does not name it, so the question makes sense without the passage;
* one probe per sentence, years, numbers and people first, at most ``limit``.

Every probe is marked ``source="self_generated"`` so the evaluator can tell
them from the product's own.

:func:`grounded_pairs` asks the same kind of question about *every* name,
year and number of every sentence, answered by the whole sentence: training
data in the shape the model is later asked in (a question alone in a chat
turn). A product's own probes are left out of it, so they stay a held-out
measure; self-generated probes are not: they are the same kind of question,
and leaving them out took away the facts they ask about (a 135M model learns
a fact from a question about it, hardly from the passage's text), so the
reward on self-generated probes measures recall of trained facts, and the
regression sets (core knowledge, earlier feedback) are the guard.

With ``ask_first`` (the generator's ``question_first`` setting), a fact is
also, or only, asked question-first where the sentence's grammar allows
(asking.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.generator.asking import AskFirst, question_first
from services.generator.subject import YEAR, Blank, mentions, owner, same_name
from shared.answers import normalize_answer
from shared.events import Probe

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z0-9])")
NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w,]?\d)")
CAPS_WORD = r"(?:[A-Z][a-z]+(?:[-'’][A-Za-z]+)*|[A-Z]{2,})"
NAME = re.compile(rf"{CAPS_WORD}(?:\s+(?:(?:of|de|la|van|von|the|du|del)\s+)?{CAPS_WORD})*")
TITLES = {
    "duke", "duchess", "king", "queen", "prince", "princess", "sir", "lord", "lady", "dame", "alderman",
    "councillor", "senator", "judge", "admiral", "colonel", "major", "lieutenant", "sergeant", "dr", "earl", "count", "countess", "baron", "baroness", "bishop", "captain", "general",
    "president", "mayor", "professor", "emperor", "empress", "abbot", "abbess",
}
MONTHS = {
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday",
    "saturday", "sunday",
}
PLACE_WORDS = {"river", "lake", "mount", "port", "cape", "isle", "bay", "fort", "castle", "loch", "glen"}
DATE_BEFORE = re.compile(
    r"\b(?:on\s+)?(?:(?:the\s+)?\d{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?)?(?:%s)(?:\s+\d{1,2}(?:st|nd|rd|th)?)?,?\s+$"
    % "|".join(m.capitalize() for m in ("january", "february", "march", "april", "may", "june", "july",
                                        "august", "september", "october", "november", "december"))
)
LEADING_PRONOUN = re.compile(r"^(It|It's|Its|He|She|His|Her|They|Their)\b")
ROLE_BEFORE = re.compile(r"\b(?:the|a|an)\s+((?:[a-z][a-z-]+\s+){0,2}[a-z][a-z-]+)(,?)\s+$")
BARE_ROLE_BEFORE = re.compile(r"\b(by|from|to|of|with|for)\s+([a-z][a-z-]+)\s+$")
FUNCTION_WORDS = {
    "the", "a", "an", "and", "or", "of", "in", "on", "at", "to", "by", "from", "with", "for", "as",
    "around", "near", "beside", "along", "across", "through", "into", "onto", "over", "under", "within",
    "between", "behind", "beyond", "towards", "toward", "upon", "about", "called", "named", "is", "was",
}
UNIT_AFTER = re.compile(
    r"^\s+([a-z][a-z-]+s|teeth|people|men|women|children|feet|geese|mice|sheep|cattle|fish)\b(?!')"
)
TRAILING_CLAUSE = re.compile(
    r",\s+(?:who|whom|which|where|when|although|though|while|whereas|and|but|whose|after|before|"
    r"making|giving|leaving)\b.*$"
)
KIND_SCORE = {"year": 3.0, "number": 3.0, "person": 3.0, "role": 2.5, "name": 1.5}

# A self-generated probe's answer is a span of the passage: one longer than this (a number
# written out over a page, a run of capitalised words) is no closed-book answer, and Probe
# itself refuses answers over 2,000 characters and more than 20 aliases.
MAX_ANSWER_CHARS = 200
MAX_ALIASES = 20


def self_generated_probes(passage: str, title: str | None, limit: int = 5) -> tuple[Probe, ...]:
    """Up to ``limit`` grounded closed-book probes from ``passage``: one per sentence first, then,
    where ``limit`` is more than the sentences that hold a fact, the other facts of those sentences."""
    if limit <= 0:
        return ()
    _, asked = _questions(passage, title)
    options = [(order, blank, probe) for order, _, blank, probe in asked]
    # Greedy: the best blank of an unused sentence, a kind already chosen counting for less;
    # once every sentence has one, the best blank of any sentence (a second fact of it).
    chosen: list[tuple[int, Probe]] = []
    used_sentences: set[int] = set()
    used_answers: set[str] = set()
    used_questions: set[str] = set()
    kinds: dict[str, int] = {}
    every_sentence_used = False
    while len(chosen) < limit:
        best = None
        for order, blank, probe in options:
            if blank.answer.lower() in used_answers or probe.question in used_questions:
                continue
            if order in used_sentences and not every_sentence_used:
                continue
            score = KIND_SCORE[blank.kind] - 0.75 * kinds.get(blank.kind, 0)
            if best is None or score > best[0]:
                best = (score, order, blank, probe)
        if best is None:
            if every_sentence_used:
                break
            every_sentence_used = True
            continue
        _, order, blank, probe = best
        chosen.append((order, probe))
        used_sentences.add(order)
        used_answers.add(blank.answer.lower())
        used_questions.add(probe.question)
        kinds[blank.kind] = kinds.get(blank.kind, 0) + 1
    return tuple(probe for _, probe in sorted(chosen, key=lambda item: item[0]))


@dataclass(frozen=True)
class GroundedPair:
    question: str
    answer: str  # the span asked about
    sentence: str  # the passage's sentence that holds it
    reply: str  # what the pair trains as the answer: the sentence; the span alone for a question-first form


def grounded_pairs(
    passage: str, title: str | None, exclude: tuple[Probe, ...] = (), limit: int = 48, *, ask_first: AskFirst = "off"
) -> tuple[GroundedPair, ...]:
    """A question for every blank of every sentence, answered by its sentence; ``exclude``'s questions
    left out. ``ask_first``: where a rule fits (:func:`question_first`), the fact is also ("also") or
    only ("instead") asked question-first, and answered by the span alone ("Ottilie Brask."): a
    question in that shape answered by a sentence, even after the span, taught the model to answer
    every question with a sentence restating it, and it lost core questions whose answer then came
    too late ("Which planet is known as the Red Planet?" -> "The Red Planet is the planet designated
    by ...")."""
    subject, asked = _questions(passage, title)
    held_out = {probe.question for probe in exclude}
    pairs: dict[str, GroundedPair] = {}
    for _, sentence, blank, probe in asked:
        answer = _named(sentence, subject)
        first = question_first(sentence, blank, subject) if ask_first != "off" else None
        for question in (first,) if first and ask_first == "instead" else (probe.question, first):
            if question and question not in held_out:
                reply = f"{blank.answer}." if question == first else answer
                pairs.setdefault(question, GroundedPair(question, blank.answer, answer, reply))
    return tuple(pairs.values())[:limit]


def _questions(passage: str, title: str | None) -> tuple[str, list[tuple[int, str, Blank, Probe]]]:
    """The subject, and (sentence number, sentence, blank, probe) for every blank a question can be asked about."""
    subject = _subject(passage, title)
    common = set(re.findall(r"\b[a-z]+\b", passage))  # words the passage writes in lower case
    asked = []
    for order, sentence in enumerate(_sentences(passage)):
        if len(sentence.split()) < 6:
            continue
        for blank in _blanks(sentence, subject):
            probe = _probe(sentence, blank, subject, common)
            if probe is not None:
                asked.append((order, sentence, blank, probe))
    return subject, asked


def _named(sentence: str, subject: str) -> str:
    """The sentence with a leading "It"/"Its" replaced by the subject, so it stands alone."""
    leading = LEADING_PRONOUN.match(sentence)
    if not subject or not leading or leading.group(1).lower() not in ("it", "its"):
        return sentence
    return (owner(subject) if leading.group(1) == "Its" else subject) + sentence[leading.end() :]


def _subject(passage: str, title: str | None) -> str:
    return re.sub(r"\s*\([^)]*\)\s*$", "", (title or "").strip()) or _subject_of(passage)


def _sentences(passage: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(passage.split())) if s.strip()]


def _subject_of(passage: str) -> str:
    first = _sentences(passage)[:1]
    match = NAME.match(first[0]) if first else None
    return match.group() if match else ""


def _blanks(sentence: str, subject: str) -> list[Blank]:
    blanks: list[Blank] = []
    taken: list[tuple[int, int]] = []
    for match in YEAR.finditer(sentence):
        if _in_parentheses(sentence, match.start()):
            continue
        phrase, start = "what year", match.start()
        before = sentence[: match.start()]
        prep = re.search(r"\b(in|since|until|by|from|after|before)\s+$", before, re.IGNORECASE)
        date = DATE_BEFORE.search(before)
        if date:  # "on 14 March 1643" -> "in what year"
            start, phrase = date.start(), "in what year"
        elif prep:
            start = prep.start()
            phrase = f"{prep.group(1).lower()} what year"
        blanks.append(Blank(start, match.end(), match.group(), (), phrase, "year"))
        taken.append(match.span())
    for match in NUMBER.finditer(sentence):
        if any(a <= match.start() < b for a, b in taken) or YEAR.fullmatch(match.group()):
            continue
        if _in_parentheses(sentence, match.start()):
            continue
        digits = match.group()
        aliases = (digits.replace(",", ""),) if "," in digits else ()
        unit = UNIT_AFTER.match(sentence[match.end() :])
        if unit:
            end = match.end() + unit.end()
            phrase = f"how many {unit.group(1)}"
            aliases += (f"{digits} {unit.group(1)}",)
        else:
            end, phrase = match.end(), "what number"
        blanks.append(Blank(match.start(), end, digits, aliases, phrase, "number"))
        taken.append(match.span())
    for match in NAME.finditer(sentence):
        blank = _name_blank(sentence, match, subject)
        if blank is not None and not any(a <= blank.start < b for a, b in taken):
            blanks.append(blank)
    return blanks


def _name_blank(sentence: str, match: re.Match[str], subject: str) -> Blank | None:
    span = match.group()
    words = span.split()
    if match.start() == 0 and len(words) == 1:
        return None  # a capitalised first word is usually just a sentence start
    if same_name(span, subject) or words[0].lower() in MONTHS:
        return None
    start, end = match.start(), match.end()
    before = sentence[:start]
    if _in_parentheses(sentence, start):
        return None  # a Latin name, a lifespan, an aside
    titled = words[0].lower().rstrip(".") in TITLES and len(words) > 1
    answer = " ".join(words[1:]) if titled else span
    person = titled or (len(words) >= 2 and bool(re.search(r"\bby\s+$", before)))
    aliases = tuple(dict.fromkeys((span, words[-1]))) if titled else ((words[-1],) if person else ())
    role = ROLE_BEFORE.search(before)
    if role and role.group(1).split()[-1] not in FUNCTION_WORDS:
        if role.group(2):  # "the provincial capital, Dray Harwick," -> "which provincial capital"
            end = end + 1 if sentence[end : end + 1] == "," else end
        noun = role.group(1).split()[-1]
        person = person or (len(words) >= 2 and noun in _PERSON_ROLES)
        aliases = aliases or ((words[-1],) if person else ())
        return Blank(role.start(), end, answer, aliases, f"which {role.group(1)}", "person" if person else "role")
    bare = BARE_ROLE_BEFORE.search(before)
    if bare and bare.group(2) not in FUNCTION_WORDS:
        person = person or (len(words) >= 2 and bare.group(2) in _PERSON_ROLES)
        aliases = aliases or ((words[-1],) if person else ())
        return Blank(bare.start(2), end, answer, aliases, f"which {bare.group(2)}", "person" if person else "role")
    if titled:
        return Blank(start, end, answer, aliases, f"which {words[0].lower().rstrip('.')}", "person")
    if person:
        return Blank(start, end, span, aliases, "whom", "person")
    if match.start() == 0:
        return None
    the = re.search(r"\bthe\s+$", before)
    if words[0].lower() in PLACE_WORDS and len(words) > 1:
        return Blank(the.start() if the else start, end, span, (), f"which {words[0].lower()}", "role")
    return Blank(the.start() if the else start, end, span, (), "what", "name")


_PERSON_ROLES = {
    "merchant", "naturalist", "architect", "engineer", "founder", "painter", "poet", "writer", "author",
    "scientist", "inventor", "composer", "explorer", "physician", "surgeon", "priest", "monk", "nun",
    "mason", "builder", "sculptor", "historian", "philosopher", "mathematician", "astronomer",
    "botanist", "chemist", "teacher", "scholar", "captain", "sailor", "clockmaker", "brewer", "printer",
    "cartographer", "surveyor", "governor", "chancellor", "abbot", "weaver", "smith", "doctor",
}


def _in_parentheses(sentence: str, position: int) -> bool:
    before = sentence[:position]
    return "(" in before and ")" not in before[before.rfind("(") :]


def _probe(sentence: str, blank: Blank, subject: str, common: set[str]) -> Probe | None:
    head, tail = sentence[: blank.start], sentence[blank.end :]
    tail = TRAILING_CLAUSE.sub("", tail)  # the clause after the blank tells nothing about it
    if not head.strip() and blank.phrase.split()[0] in ("in", "since", "until", "by", "from", "after", "before"):
        # "In 1928 the firm moved ..." -> "The firm moved ... in what year"
        rest = re.sub(r"^[\s,]+", "", re.sub(r"[.!?;:,]+$", "", tail))
        text = f"{rest[:1].upper()}{rest[1:]} {blank.phrase}" if rest else blank.phrase
    else:
        text = head + blank.phrase + tail
    text = re.sub(r"\s+([,.;:])", r"\1", text).strip()
    text = re.sub(r"[.!?;:,]+$", "", text)
    if subject:
        leading = LEADING_PRONOUN.match(text)
        if leading and leading.group(1).lower() in ("it", "its", "it's"):
            possessive = leading.group(1).lower() == "its"
            text = LEADING_PRONOUN.sub(owner(subject) if possessive else subject, text, count=1)
        elif not mentions(text, subject):
            text = f"About {subject}: {text[0].lower() + text[1:] if _lower_ok(text, common) else text}"
    question = text + "?"
    if blank.answer.lower() in question.lower() or len(question) > 400 or len(blank.answer) > MAX_ANSWER_CHARS:
        return None  # a closed-book answer is a name, a number, a short phrase: not a paragraph
    if not normalize_answer(blank.answer):
        return None  # "...": no answer could match it
    aliases = tuple(
        a for a in dict.fromkeys(blank.aliases) if a.lower() != blank.answer.lower() and len(a) <= MAX_ANSWER_CHARS
    )[:MAX_ALIASES]
    return Probe(question=question, answer=blank.answer, aliases=aliases, source="self_generated")


def _lower_ok(text: str, common: set[str]) -> bool:
    """May the first word lose its capital? Only when it is an ordinary word."""
    first = text.split()[0] if text.split() else ""
    return first.isalpha() and (first.lower() in common or first.lower() in FUNCTION_WORDS or first in _STARTERS)


_STARTERS = {"The", "A", "An", "Every", "Each", "During", "After", "Before", "Its", "Some", "Most", "Many"}
