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

With ``ask_first`` (the generator's ``question_first`` setting, "off" by
default), where the sentence's grammar allows (a passive, or an active verb
in the past tense), the pairs ask a fact question-first, the way a person
asks ("Which merchant founded Quellmoor's local grammar school?", "From which
duke did Quellmoor receive its market charter?"): "also" beside its cloze
question, "instead" of it (the same number of pairs). A fact trained only in
the passage's own word order is recalled in that order, and a question in
other words can miss it after later updates. "also" is not the default:
with one candidate at 0.75 strength, the extra pairs made later updates lose
3-4 core questions and the gate refused them (bench/RESULTS.md, "Forgetting").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lemminflect import getAllLemmas, getInflection

from shared.events import Probe

# Whether a fact is also, or only, asked question-first (grounded_pairs).
AskFirst = Literal["off", "also", "instead"]

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z0-9])")
YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
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
IRREGULAR_PAST = {
    "written": "wrote", "drawn": "drew", "given": "gave", "taken": "took", "begun": "began", "known": "knew",
    "shown": "showed", "grown": "grew", "driven": "drove", "chosen": "chose", "spoken": "spoke", "broken": "broke",
    "seen": "saw", "sung": "sang", "thrown": "threw", "flown": "flew", "woven": "wove", "ridden": "rode",
    "sewn": "sewed", "sown": "sowed", "undertaken": "undertook", "overseen": "oversaw", "rewritten": "rewrote",
}
PARTICIPLE = (
    r"(?:[a-z]+ed|built|made|laid|held|sold|bought|won|brought|taught|kept|found|led|set|run|struck|told|sent|paid|"
    + "|".join(IRREGULAR_PAST) + ")"
)
ADVERB = r"(?:[a-z]+ly|first|later|once|then|also|jointly|since)"
NOUN_PHRASE = r"(?:(?:[Tt]he|[Ii]ts|[Aa]n?)\s+)?(?:[\w'’-]+\s+){0,4}[\w'’-]+"
AUXILIARIES = {"was", "were", "is", "are", "be", "been", "being", "has", "have", "had", "will", "would", "can", "could"}
CONJUNCTIONS = {"and", "but", "or", "although", "though", "while", "when", "where", "which", "who", "whom", "until", "because"}
GENERIC_NOUNS = {
    "firm", "company", "species", "town", "city", "village", "bird", "animal", "plant", "business", "society",
    "ship", "island", "band", "museum", "institute", "club", "brand", "order", "school", "college", "festival",
    "building", "church", "bridge", "castle", "estate", "manufacturer", "organisation", "organization",
    "law", "act", "treaty", "game", "novel", "book", "poem", "painting", "song", "opera", "play", "coin",
    "lighthouse", "observatory", "monastery", "abbey", "university", "newspaper", "river", "lake", "mountain",
    "glacier", "mineral", "disease", "dish", "variety", "breed", "beetle", "insect", "fish", "tree", "instrument",
    "device", "machine", "clock", "vessel", "expedition", "team", "railway", "canal", "market", "port",
}
KIND_SCORE = {"year": 3.0, "number": 3.0, "person": 3.0, "role": 2.5, "name": 1.5}


@dataclass(frozen=True)
class _Blank:
    start: int
    end: int
    answer: str
    aliases: tuple[str, ...]
    phrase: str  # what replaces sentence[start:end]
    kind: str


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
    sentence: str  # the passage's sentence that holds it: the trained answer


def grounded_pairs(
    passage: str, title: str | None, exclude: tuple[Probe, ...] = (), limit: int = 48, *, ask_first: AskFirst = "off"
) -> tuple[GroundedPair, ...]:
    """A question for every blank of every sentence, answered by its sentence; ``exclude``'s questions
    left out. ``ask_first``: where a rule fits (:func:`question_first`), the fact is also ("also") or
    only ("instead") asked question-first."""
    subject, asked = _questions(passage, title)
    held_out = {probe.question for probe in exclude}
    pairs: dict[str, GroundedPair] = {}
    for _, sentence, blank, probe in asked:
        answer = _named(sentence, subject)
        first = question_first(sentence, blank, subject) if ask_first != "off" else None
        for question in (first,) if first and ask_first == "instead" else (probe.question, first):
            if question and question not in held_out:
                pairs.setdefault(question, GroundedPair(question, blank.answer, answer))
    return tuple(pairs.values())[:limit]


def question_first(sentence: str, blank: _Blank, subject: str) -> str | None:
    """The blank asked the way a person asks, question word first: "Which merchant founded ...?",
    "In what year was ... established?", "From which duke did ... receive ...?"; None where no
    rule fits the sentence."""
    head, tail = sentence[: blank.start], sentence[blank.end :]
    question = _passive_question(head, tail, blank, subject) or _active_question(head, tail, blank, subject)
    if question is None or blank.answer.lower() in question.lower() or len(question) > 300:
        return None
    return question


def _passive_question(head: str, tail: str, blank: _Blank, subject: str) -> str | None:
    """For a fact stated in the passive: "founded by the merchant X", "was first described in 1874"."""
    if blank.kind in ("person", "role") and re.search(r"\bby\s+$", head) and blank.phrase.startswith("which "):
        clause = _passive_end(re.sub(r"\s*\bby\s+$", "", head), adjunct=True)
        if clause is None:
            return None
        np, verb = clause
        *adverb, participle = verb.split()
        asked = _asked_np(np, subject)
        past = " ".join([*adverb, IRREGULAR_PAST.get(participle, participle)])
        return f"{blank.phrase[0].upper()}{blank.phrase[1:]} {past} {asked}?" if asked else None
    if blank.kind == "year" and blank.phrase == "in what year":
        clause = _passive_end(head, adjunct=False) if head.strip() else None
        if clause is None:  # "In 1974 the firm was acquired by ..." (or ", and in 1974 ...")
            leading = re.match(rf"^,?\s+({NOUN_PHRASE})\s+(?:was|were)\s+((?:{ADVERB}\s+)?{PARTICIPLE})\b", tail)
            clause = (leading.group(1), leading.group(2)) if leading and _clause_start(head) else None
        if clause is None:
            return None
        np, verb = clause
        asked = _asked_np(np, subject)
        aux = "were" if re.search(r"\bwere\s+(?:\w+\s+)?$", head) or re.search(r"^,?\s+\S.*?\bwere\b", tail) else "was"
        return f"In what year {aux} {asked} {verb}?" if asked else None
    return None


def _active_question(head: str, tail: str, blank: _Blank, subject: str) -> str | None:
    """For a fact stated with an active verb in the past tense, asked with "did" and the verb's base
    form: "It received its market charter in 1387 from Duke ..." -> "In what year did Quellmoor
    receive its market charter?", "From which duke did Quellmoor receive its market charter?"."""
    if blank.kind == "year" and blank.phrase == "in what year":
        if head.strip():  # "<subject> <verb> <object> in 1891"
            clause = _active(_clause_of(head))
        else:  # "In 1928 the firm moved its works to ..., where ..."
            clause = _active(re.split(r"[,;]", re.sub(r"^[\s,]+", "", tail), maxsplit=1)[0])
        if clause is None:
            return None
        np, base, rest = clause
        wording = "In what year did"
    elif blank.kind in ("person", "role") and (blank.phrase.startswith("which ") or blank.phrase == "whom"):
        prep = re.search(r"\b(from|to|with|for|under|against|into|towards)\s+$", head)
        clause = _active(_clause_of(head[: prep.start()] if prep else head))
        if clause is None:
            return None
        np, base, rest = clause
        if not prep and rest:
            return None  # the blank is not the verb's object
        phrase = "who" if blank.phrase == "whom" and not prep else blank.phrase
        wording = f"{prep.group(1).capitalize()} {phrase}" if prep else phrase[0].upper() + phrase[1:]
        wording += " did"
    else:
        return None
    asked = np[0].lower() + np[1:] if np.split()[0].lower() in ("a", "an") else _asked_np(np, subject)
    if not asked:
        return None
    rest = _named_in(rest.strip(" ,;"), subject)
    question = " ".join(part for part in (wording, asked, base, rest) if part) + "?"
    return question if subject and _mentions(question, subject) else None


def _clause_of(head: str) -> str:
    """The clause a blank stands in: after a leading "In 1974," and after the last ", and" or ";"."""
    clause = re.split(r";\s+|,\s+(?:and|but)\s+", head.strip())[-1]
    return re.sub(r"^(?:[Ii]n|[Bb]y|[Dd]uring)\s+(?:the\s+)?\d{4}s?,?\s+", "", clause)


def _active(clause: str) -> tuple[str, str, str] | None:
    """(noun phrase, the verb's base form, the rest) for "<noun phrase> <past-tense verb> <rest>",
    the noun phrase at most five words; None where no such verb follows it."""
    words = clause.split()
    for i, word in enumerate(words[:6]):
        if word.lower() in AUXILIARIES or not re.fullmatch(r"[\w'’-]+", word):
            return None  # "the clock was damaged": a passive, or no plain noun phrase
        base = _past_base(word) if i else None
        if base:
            np = " ".join(words[:i])
            # "... its market charter in 1387 (from Duke ...)": a trailing date says nothing of the blank
            rest = re.sub(r"\s+(?:in|on|during|by|around)\s+(?:the\s+)?\d{4}s?$", "", " ".join(words[i + 1 :])).split()
            if np.lower() in ("a", "an", "the", "its") or not re.fullmatch(NOUN_PHRASE, np):
                return None
            # One clause: no second verb, year or conjunction in the rest ("The largest recorded
            # performance took place": "recorded" was an adjective).
            if any(w.lower() in AUXILIARIES | CONJUNCTIONS or YEAR.search(w) or _past_base(w) for w in rest):
                return None
            return np, base, re.sub(r"[.!?]+$", "", " ".join(rest))
    return None


def _past_base(word: str) -> str | None:
    """The base form of a verb in the simple past ("received" -> "receive", "fell" -> "fall"), from
    lemminflect's dictionary: None for any other word (and for "was", which a question inverts)."""
    lemmas = getAllLemmas(word.lower(), upos="VERB").get("VERB")
    if not lemmas or not word.islower():
        return None
    base = lemmas[0]
    if base in ("be", "have", "do") or base == word or word not in getInflection(base, tag="VBD"):
        return None
    return base


def _named_in(text: str, subject: str) -> str:
    """``text`` with its first "the town" / "the firm" (a word for the subject) naming the subject."""
    for match in re.finditer(r"\bthe\s+([a-z]+)\b", text):
        if _stands_for(match.group(1), subject):
            return text[: match.start()] + subject + text[match.end() :]
    return text


def _stands_for(noun: str, subject: str) -> bool:
    """Does "the <noun>" speak of the subject: a word for a kind of thing ("the firm"), or one of
    the subject's own words ("the glacier" of Kaldrannen Glacier)?"""
    own_words = {w.lower() for w in re.findall(r"[A-Za-z]+", subject)}
    return bool(subject) and (noun.lower() in GENERIC_NOUNS or noun.lower() in own_words)


def _passive_end(text: str, adjunct: bool) -> tuple[str, str] | None:
    """(noun phrase, "[adverb] participle") for a clause ending in a passive verb: "The species was
    first described [in 1874]", "the Greyhollow Wetland Reserve, established", "Velliver Instruments
    was a manufacturer of surveying equipment founded [in 1902 in ...]". ``adjunct``: a trailing
    "in/at/on/during ..." after the verb may be dropped."""
    text = text.rstrip()
    ending = rf"(?P<verb>(?:{ADVERB}\s+)?{PARTICIPLE})" + (r"(?:\s+(?:in|at|on|during|from)\s+[^,;]*)?" if adjunct else "")
    match = re.search(rf"(?:\b(?:was|were)\s+|,\s+|^(?P<lead>.+?)\s+(?:was|is)\s+(?:a|an)\s+[^,;]*?\s+){ending}$", text)
    if match is None:
        return None
    if match.group("lead") is not None:  # "<Subject> was a manufacturer ... founded": the sentence's subject
        lead = match.group("lead")
        return (lead, match.group("verb")) if re.fullmatch(NOUN_PHRASE, lead) else None
    before = text[: match.start()].rstrip(" ,")
    if text[match.start()] == ",":  # an appositive: the noun phrase just before the comma
        # after a preposition only where a verb governs it ("protected within the ... Reserve,"):
        # "a monastery in the Kalveth Highlands, founded" speaks of the monastery
        np = re.search(rf"(?:^|,\s+|\b[a-z]+ed\s+(?:in|within|at|into|near|by)\s+)({NOUN_PHRASE})$", before)
    else:  # the clause's subject: after the last comma, "and", or leading "in 1974"
        np = re.search(rf"(?:^|,\s+)(?:(?:and|but|while|when)\s+)?(?:in\s+\d{{4}},?\s+)?({NOUN_PHRASE})$", before, re.IGNORECASE)
    return (np.group(1), match.group("verb")) if np else None


def _clause_start(head: str) -> bool:
    """Is the blank (a leading "in 1974") where a clause starts: the sentence's start or after ", and"?"""
    return not head.strip() or bool(re.search(r"(?:,|;)\s+(?:and\s+|but\s+)?$", head))


def _asked_np(np: str, subject: str) -> str | None:
    """The noun phrase as a stand-alone question names it: "It"/"the firm" -> the subject, "the
    local grammar school" -> "Quellmoor's local grammar school", a name as it stands."""
    words = np.split()
    first = words[0].lower()
    if first in ("it", "he", "she", "they"):
        return subject or None
    if first == "its":
        return f"{_owner(subject)} {' '.join(words[1:])}" if subject else None
    if first == "the" and len(words) == 2 and _stands_for(words[1], subject):
        return subject  # "the firm", "the glacier" (of Kaldrannen Glacier)
    if len(words) == 1 and not (subject and _same_name(np, subject)):
        return None  # "Production was first recorded": one word tells nothing on its own
    if subject and _mentions(np, subject):
        return np[0].lower() + np[1:] if first in ("the", "a", "an") else np
    if first == "the" and all(w[:1].islower() or not w[:1].isalpha() for w in words[1:]):
        return f"{_owner(subject)} {' '.join(words[1:])}" if subject else None
    if first in ("the", "a", "an"):
        return "the " + " ".join(words[1:]) if words[1][:1].isupper() else None
    return np if np[:1].isupper() else None


def _questions(passage: str, title: str | None) -> tuple[str, list[tuple[int, str, _Blank, Probe]]]:
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
    return (_owner(subject) if leading.group(1) == "Its" else subject) + sentence[leading.end() :]


def _owner(subject: str) -> str:
    """The subject's possessive: "Quellmoor's", "Velliver Instruments'"."""
    return f"{subject}'" if subject.endswith("s") else f"{subject}'s"


def _subject(passage: str, title: str | None) -> str:
    return re.sub(r"\s*\([^)]*\)\s*$", "", (title or "").strip()) or _subject_of(passage)


def _sentences(passage: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(passage.split())) if s.strip()]


def _subject_of(passage: str) -> str:
    first = _sentences(passage)[:1]
    match = NAME.match(first[0]) if first else None
    return match.group() if match else ""


def _blanks(sentence: str, subject: str) -> list[_Blank]:
    blanks: list[_Blank] = []
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
        blanks.append(_Blank(start, match.end(), match.group(), (), phrase, "year"))
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
        blanks.append(_Blank(match.start(), end, digits, aliases, phrase, "number"))
        taken.append(match.span())
    for match in NAME.finditer(sentence):
        blank = _name_blank(sentence, match, subject)
        if blank is not None and not any(a <= blank.start < b for a, b in taken):
            blanks.append(blank)
    return blanks


def _name_blank(sentence: str, match: re.Match[str], subject: str) -> _Blank | None:
    span = match.group()
    words = span.split()
    if match.start() == 0 and len(words) == 1:
        return None  # a capitalised first word is usually just a sentence start
    if _same_name(span, subject) or words[0].lower() in MONTHS:
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
        return _Blank(role.start(), end, answer, aliases, f"which {role.group(1)}", "person" if person else "role")
    bare = BARE_ROLE_BEFORE.search(before)
    if bare and bare.group(2) not in FUNCTION_WORDS:
        person = person or (len(words) >= 2 and bare.group(2) in _PERSON_ROLES)
        aliases = aliases or ((words[-1],) if person else ())
        return _Blank(bare.start(2), end, answer, aliases, f"which {bare.group(2)}", "person" if person else "role")
    if titled:
        return _Blank(start, end, answer, aliases, f"which {words[0].lower().rstrip('.')}", "person")
    if person:
        return _Blank(start, end, span, aliases, "whom", "person")
    if match.start() == 0:
        return None
    the = re.search(r"\bthe\s+$", before)
    if words[0].lower() in PLACE_WORDS and len(words) > 1:
        return _Blank(the.start() if the else start, end, span, (), f"which {words[0].lower()}", "role")
    return _Blank(the.start() if the else start, end, span, (), "what", "name")


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


def _same_name(span: str, subject: str) -> bool:
    if not subject:
        return False
    plain = re.sub(r"['’]s$", "", span).lower()
    return plain == subject.lower() or plain in subject.lower().split()


def _probe(sentence: str, blank: _Blank, subject: str, common: set[str]) -> Probe | None:
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
            text = LEADING_PRONOUN.sub(_owner(subject) if possessive else subject, text, count=1)
        elif not _mentions(text, subject):
            text = f"About {subject}: {text[0].lower() + text[1:] if _lower_ok(text, common) else text}"
    question = text + "?"
    if blank.answer.lower() in question.lower() or len(question) > 400:
        return None
    aliases = tuple(a for a in dict.fromkeys(blank.aliases) if a.lower() != blank.answer.lower())
    return Probe(question=question, answer=blank.answer, aliases=aliases, source="self_generated")


def _mentions(text: str, subject: str) -> bool:
    words = [w for w in re.findall(r"[A-Za-z]+", subject) if len(w) > 2]
    words = [w for w in words if w[0].isupper()] or words
    return any(re.search(rf"\b{re.escape(w)}", text, re.IGNORECASE) for w in words)


def _lower_ok(text: str, common: set[str]) -> bool:
    """May the first word lose its capital? Only when it is an ordinary word."""
    first = text.split()[0] if text.split() else ""
    return first.isalpha() and (first.lower() in common or first.lower() in FUNCTION_WORDS or first in _STARTERS)


_STARTERS = {"The", "A", "An", "Every", "Each", "During", "After", "Before", "Its", "Some", "Most", "Many"}
