"""What must never be trained on: PII, secrets, prompt injection, blocked terms.

Each check returns readable reasons that never repeat the offending text
(an email address found in a self-edit must not travel on in the rejection
event). Feedback is screened when it arrives; every candidate's whole
completion is screened again, since the model may invent such things.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from shared.answers import normalize_answer
from shared.events import CorrectionFeedback, KnowledgeFeedback, PreferenceFeedback

# Every pattern is linear in the text: a match starts only where a run of its characters starts
# (tried at every position of a 20,000-character run, the address took seconds; ``^\s*`` below
# spanned lines, and a passage of newlines took hours), since feedback is hostile input.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<![\w.,])\+?\(?\d[\d\s().-]{7,}\d(?![\w]|[.,]\d)")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")

SECRETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("an AWS access key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),
    ("a Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("an API key", re.compile(r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_-]{20,}")),
    ("a Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("a JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    (
        "a password or secret assignment",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|passphrase|secret|api[_ -]?key|access[_ -]?key|"
            r"auth[_ -]?token|bearer|client[_ -]?secret|private[_ -]?key)\b\s*(?:is\s*)?[:=]\s*['\"]?[^\s'\"]{6,}"
        ),
    ),
)
LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_-])")

INJECTION: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "an instruction override",
        re.compile(
            r"(?i)\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(?:previous|prior|above|"
            r"earlier|preceding|all|any|your|the)\b[^.\n]{0,40}?\b(?:instructions?|prompts?|rules|"
            r"directions|guidelines|guardrails)\b"
        ),
    ),
    (
        "a request to reveal hidden instructions",
        re.compile(
            r"(?i)\b(?:reveal|print|show|repeat|output|leak|tell me)\b[^.\n]{0,30}?\b(?:system|hidden|secret|"
            r"initial)\s+(?:prompt|instructions?|message)"
        ),
    ),
    ("a jailbreak phrase", re.compile(r"(?i)\b(?:jailbreak|jailbroken|developer mode|do anything now|DAN mode)\b")),
    ("a role takeover", re.compile(r"(?i)\b(?:from now on,? you (?:are|will|must)|you are no longer bound|pretend (?:to be|you are))\b")),
    ("chat-template control tokens", re.compile(r"<\|[a-z_]{2,20}\|>|\[/?INST\]|<</?SYS>>|<\|(?:im_start|im_end)")),
    ("a fake system turn", re.compile(r"(?im)^[ \t]*(?:#+[ \t]*)?system[ \t]*(?:prompt)?[ \t]*:")),
)


def find_pii(text: str) -> list[str]:
    reasons = []
    if EMAIL.search(text):
        reasons.append("contains an email address")
    if any(_looks_like_phone(m.group()) for m in PHONE.finditer(text)):
        reasons.append("contains a phone number")
    if any(_luhn_ok(m.group()) for m in CARD.finditer(text)):
        reasons.append("contains a payment card number")
    for label, pattern in SECRETS:
        if pattern.search(text):
            reasons.append(f"contains what looks like {label}")
    if any(_looks_like_key(m.group()) for m in LONG_TOKEN.finditer(text)):
        reasons.append("contains a long random-looking token (a possible key or secret)")
    return reasons


def find_injection(text: str) -> list[str]:
    return [f"contains a prompt-injection pattern ({label})" for label, pattern in INJECTION if pattern.search(text)]


def find_blocked(text: str, blocklist: Iterable[str]) -> list[str]:
    reasons = []
    for term in blocklist:
        term = term.strip()
        if term and _blocked_term(term).search(text):
            reasons.append(f"contains {term!r}, which is on the scope's blocklist")
    return reasons


def screen_text(text: str, blocklist: Iterable[str] = ()) -> list[str]:
    """Every reason ``text`` must not be trained on; empty when it is clean. Screened as written
    and as read (:func:`as_read`): a zero-width space before the ``@``, a full-width ``＠`` or a
    soft hyphen inside "Ignore" hid an address or an injection from the patterns."""
    found = []
    for view in dict.fromkeys((text, as_read(text))):
        found += [*find_pii(view), *find_injection(view), *find_blocked(view, blocklist)]
    return list(dict.fromkeys(found))


def as_read(text: str) -> str:
    """``text`` as a reader (or a tokenizer's normalizer) takes it: compatibility forms folded
    (NFKC: full-width letters and signs to their plain forms), invisible format characters
    (zero-width spaces and joiners, soft hyphens, direction marks) removed."""
    folded = unicodedata.normalize("NFKC", text).translate(BLANK_LETTERS)
    return "".join(c for c in folded if unicodedata.category(c) != "Cf")


# Letters by category that show as blank space (Hangul fillers): read as spaces, so that
# "Ignore\u3164all\u3164previous\u3164instructions" is read as words, and a passage of them as empty.
BLANK_LETTERS = str.maketrans({c: " " for c in "\u115f\u1160\u3164\uffa0"})


def feedback_texts(content: KnowledgeFeedback | CorrectionFeedback | PreferenceFeedback) -> list[str]:
    """Every piece of text a feedback brings, in a stable order."""
    if isinstance(content, KnowledgeFeedback):
        texts = [content.title or "", content.passage]
        for probe in content.probes:
            texts += [probe.question, probe.answer, *probe.aliases]
        return [t for t in texts if t]
    if isinstance(content, CorrectionFeedback):
        return [t for t in (content.question, content.wrong_answer, content.right_answer) if t]
    texts = [content.instruction]
    for example in content.examples:
        texts += [example.prompt, example.response]
    return texts


def screen_feedback(
    content: KnowledgeFeedback | CorrectionFeedback | PreferenceFeedback, blocklist: Sequence[str] = ()
) -> list[str]:
    """Reasons to refuse a feedback before any self-edit is written from it."""
    return screen_text("\n".join(feedback_texts(content)), blocklist) + unanswerable(content) + wordless(content)


def wordless(content: KnowledgeFeedback | CorrectionFeedback | PreferenceFeedback) -> list[str]:
    """Feedback with nothing in it to learn ("." or zero-width spaces): each candidate would cost
    a training and an evaluation, and teach nothing."""
    text = content.passage if isinstance(content, KnowledgeFeedback) else (
        content.question if isinstance(content, CorrectionFeedback) else content.instruction)
    what = {"knowledge": "passage", "correction": "question", "preference": "instruction"}[content.kind]
    return [] if any(c.isalnum() for c in as_read(text)) else [f"{what} has no letter or digit in it: nothing to learn"]


def unanswerable(content: KnowledgeFeedback | CorrectionFeedback | PreferenceFeedback) -> list[str]:
    """Answers the evaluator could never find right: nothing is left of them, or of any of their
    aliases, once case and punctuation are set aside ("...", "?!"). An alias alone that is empty
    is harmless: the answer and the other aliases still match."""
    if isinstance(content, KnowledgeFeedback):
        answers = [("probe answer", probe.answer, probe.aliases) for probe in content.probes]
    elif isinstance(content, CorrectionFeedback):
        answers = [("right answer", content.right_answer, ())]
    else:
        answers = [("example response", example.response, ()) for example in content.examples]
    return [
        f"{what} {answer[:80]!r} has nothing to compare once case and punctuation are set aside: "
        "no answer could match it"
        for what, answer, aliases in answers
        if not any(normalize_answer(a) for a in (answer, *aliases))
    ]


# --------------------------------------------------------------------------- helpers


def _looks_like_phone(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if not 9 <= len(digits) <= 15:
        return False
    groups = re.findall(r"\d+", candidate)
    # "1387 1552 1891": a run of years, not a number to call.
    if all(len(g) == 4 and 1000 <= int(g) <= 2199 for g in groups):
        return False
    return candidate.lstrip().startswith(("+", "(")) or len(groups) >= 2 or len(digits) in (10, 11)


def _luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


WORD_LIKE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+|\d+")


def _looks_like_key(token: str) -> bool:
    if re.fullmatch(r"[0-9a-fA-F]{32,}", token):
        return True  # a hex digest or key
    parts = [p for p in re.split(r"[-_/+]", token.rstrip("=")) if p]
    if len(parts) > 1 and all(WORD_LIKE.fullmatch(p) for p in parts):
        return False  # words and numbers joined by hyphens ("Varnholt-Mill-1387-...") are prose
    classes = sum(bool(re.search(p, token)) for p in (r"[a-z]", r"[A-Z]", r"\d"))
    if classes < 3:
        return False
    counts = Counter(token)
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())
    return entropy >= 4.0


def _blocked_term(term: str) -> re.Pattern[str]:
    escaped = re.escape(term)
    left = r"\b" if term[0].isalnum() else ""
    right = r"\b" if term[-1].isalnum() else ""
    return re.compile(left + escaped + right, re.IGNORECASE)
