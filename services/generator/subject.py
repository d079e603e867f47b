"""What the probe writers share about a passage: its subject, and a blank in one of its sentences.

A *blank* is the span of a sentence that a question asks about (a year, a
number, a name) and the words that stand in its place ("in what year",
"which merchant"). The *subject* is what the passage is about: its title, or
the name its first sentence starts with. The helpers here say how a text
names the subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")


@dataclass(frozen=True)
class Blank:
    start: int
    end: int
    answer: str
    aliases: tuple[str, ...]
    phrase: str  # what replaces sentence[start:end]
    kind: str  # "year", "number", "person", "role" or "name"


def owner(subject: str) -> str:
    """The subject's possessive: "Quellmoor's", "Velliver Instruments'"."""
    return f"{subject}'" if subject.endswith("s") else f"{subject}'s"


def same_name(span: str, subject: str) -> bool:
    """Is ``span`` the subject's name, or one word of it ("Quellmoor's", "Kaldrannen")?"""
    if not subject:
        return False
    plain = re.sub(r"['’]s$", "", span).lower()
    return plain == subject.lower() or plain in subject.lower().split()


def mentions(text: str, subject: str) -> bool:
    """Does ``text`` name the subject: one of its longer words, its capitalised ones where it has any?"""
    words = [w for w in re.findall(r"[A-Za-z]+", subject) if len(w) > 2]
    words = [w for w in words if w[0].isupper()] or words
    return any(re.search(rf"\b{re.escape(w)}", text, re.IGNORECASE) for w in words)
