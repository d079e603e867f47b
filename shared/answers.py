"""How answers are compared: SQuAD's normalisation, with numbers (see :mod:`shared.scoring`).

Standard library only, so that the contracts can check a probe's answer with it
without importing the model stack.
"""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_KEEP_POINT = "\x00"
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, plus number handling (lower case; punctuation, thousands separators
    and a/an/the dropped; decimal points kept; the number words zero..twenty as digits)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", text)
    text = _DECIMAL_POINT.sub(_KEEP_POINT, text)
    text = "".join(ch for ch in text if not _is_punctuation(ch)).replace(_KEEP_POINT, ".")
    # An answer that is an article alone ("A", a grade or a blood type) keeps it: nothing would be left.
    # Such a reference is matched by an answer that is that word alone, never found inside a longer
    # one (there, "a" is the article: "She got a B").
    text = _ARTICLES.sub(" ", text) if _ARTICLES.sub(" ", text).strip() else text
    return " ".join(_NUMBER_WORDS.get(token, token) for token in text.split())
