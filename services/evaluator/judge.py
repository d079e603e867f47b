"""An optional LLM judge behind any OpenAI-compatible ``/chat/completions`` endpoint.

Off by default. :func:`shared.scoring.grade_answers` asks it only about
answers the rules marked wrong, and it can only turn them right. It never
makes an evaluation fail: on a timeout, an HTTP error or an answer that is
neither yes nor no it returns None (no verdict, the rules stand), and after
a few failures in a row it stops asking for a while.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import httpx

from services.evaluator.settings import JudgeSettings

log = logging.getLogger(__name__)

SYSTEM = (
    "You grade answers to closed-book quiz questions. Reply with exactly one word: "
    "yes if the answer means the same as one of the reference answers, no otherwise."
)
FAILURES_BEFORE_PAUSE = 3
PAUSE_S = 60.0


class OpenAICompatibleJudge:
    def __init__(self, settings: JudgeSettings, transport: httpx.BaseTransport | None = None):
        self.settings = settings
        headers = {}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self.client = httpx.Client(
            base_url=settings.base_url.rstrip("/"), headers=headers, timeout=settings.timeout_s, transport=transport
        )
        self._failures = 0
        self._paused_until = 0.0

    @property
    def identity(self) -> str:
        """What the cache must tell apart: which judge graded."""
        return f"{self.settings.base_url}#{self.settings.model}"

    def __call__(self, question: str, prediction: str, references: Sequence[str]) -> bool | None:
        if time.monotonic() < self._paused_until:
            return None
        prompt = (
            f"Question: {question}\nReference answers: {' | '.join(references)}\n"
            f"Answer to grade: {prediction}\nIs the answer correct?"
        )
        try:
            response = self.client.post(
                "/chat/completions",
                json={
                    "model": self.settings.model,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                    "temperature": 0,
                    "max_tokens": 3,
                },
            )
            response.raise_for_status()
            text = response.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            self._failures += 1
            if self._failures >= FAILURES_BEFORE_PAUSE:
                self._paused_until = time.monotonic() + PAUSE_S
                log.warning("judge failed %d times in a row; rules only for %.0fs: %s", self._failures, PAUSE_S, exc)
            return None
        self._failures = 0
        word = _text_of(text).strip().lower().lstrip("\"'*").split(maxsplit=1)
        if not word:
            return None
        if word[0].startswith("yes"):
            return True
        if word[0].startswith("no"):
            return False
        return None

    def close(self) -> None:
        self.client.close()


def _text_of(content: object) -> str:
    """A chat reply's text: a string, or the text parts of a list of content parts (the form some
    OpenAI-compatible servers answer in); anything else is no verdict, never an error."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""
