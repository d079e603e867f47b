"""Asking a fact question-first, the way a person asks.

The probes and grounded pairs of probes.py ask about a blank in the
sentence's own word order ("Quellmoor received its market charter in 1387
from which duke?"). Where the sentence's grammar allows (a passive, or an
active verb in the past tense), :func:`question_first` asks the same blank
question word first ("From which duke did Quellmoor receive its market
charter?", "Which merchant founded Quellmoor's local grammar school?"): a
fact trained only in the passage's word order is recalled in that order, and
a question in other words can miss it after later updates. Where no rule
fits the clause, there is no form.

The generator's ``question_first`` setting puts these forms beside their
cloze questions ("also") or in their place ("instead"); a form is answered
by the span alone (probes.grounded_pairs): answered by the sentence (or the
span, then the sentence), the forms taught the model to answer every
question with a sentence that restates it, later updates lost 3-5 core
questions that way and the gate refused them. It is "off" by default until
an 8-update forgetting run shows what "also" does to retention; over 2
updates it kept all of the first passage and every core question
(bench/RESULTS.md, "Forgetting").
"""

from __future__ import annotations

import re
from typing import Literal

from lemminflect import getAllLemmas, getInflection

from services.generator.subject import YEAR, Blank, mentions, owner, same_name

# Where grounded pairs ask a fact question-first: nowhere, beside its cloze question, in its place.
AskFirst = Literal["off", "also", "instead"]

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


def question_first(sentence: str, blank: Blank, subject: str) -> str | None:
    """The blank asked the way a person asks, question word first: "Which merchant founded ...?",
    "In what year was ... established?", "From which duke did ... receive ...?"; None where no
    rule fits the sentence."""
    head, tail = sentence[: blank.start], sentence[blank.end :]
    question = _passive_question(head, tail, blank, subject) or _active_question(head, tail, blank, subject)
    if question is None or blank.answer.lower() in question.lower() or len(question) > 300:
        return None
    return question


def _passive_question(head: str, tail: str, blank: Blank, subject: str) -> str | None:
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


def _active_question(head: str, tail: str, blank: Blank, subject: str) -> str | None:
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
    return question if subject and mentions(question, subject) else None


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
        return f"{owner(subject)} {' '.join(words[1:])}" if subject else None
    if first == "the" and len(words) == 2 and _stands_for(words[1], subject):
        return subject  # "the firm", "the glacier" (of Kaldrannen Glacier)
    if len(words) == 1 and not (subject and same_name(np, subject)):
        return None  # "Production was first recorded": one word tells nothing on its own
    if subject and mentions(np, subject):
        return np[0].lower() + np[1:] if first in ("the", "a", "an") else np
    if first == "the" and all(w[:1].islower() or not w[:1].isalpha() for w in words[1:]):
        return f"{owner(subject)} {' '.join(words[1:])}" if subject else None
    if first in ("the", "a", "an"):
        return "the " + " ".join(words[1:]) if words[1][:1].isupper() else None
    return np if np[:1].isupper() else None
