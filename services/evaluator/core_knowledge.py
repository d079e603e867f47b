"""The core-knowledge set: general questions an update must not make the model forget.

The packaged set (``data/core.jsonl``) holds questions chosen because the
default base model (SmolLM2-135M-Instruct) answers them; under this
platform's own scoring (chat template, 32 new tokens, first line) it answers
98 of the 107.

By default every question is asked (``core_filter``: ``never``), so the
regression gate weighs the net change in core accuracy. Any update, even one
that teaches nothing, flips a few answers both ways: on dev.jsonl a
one-epoch update on the bare passage turned 3 right answers wrong and 1
wrong answer right, and the default update loses 3-4 while it gains 2
(bench/RESULTS.md). On a set filtered to the questions the base answers
correctly only the losses can show, so the gate would reject nearly every
update for that churn alone. ``always`` filters the set to the questions
*this* base answers correctly (a stricter, one-sided gate); ``auto`` trusts
the packaged set for the default base and filters any other. A filter runs
once per base and scoring settings and is remembered in memory and,
optionally, in the object store, so a restart or a second replica does not
ask again.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from shared.events import EventValidationError, Probe
from shared.models import DEFAULT_MODEL
from shared.scoring import ClosedBookResult

log = logging.getLogger(__name__)

CORE_CACHE_PREFIX = "evaluator/core-knowledge"


def load_question_set(path: Path) -> tuple[Probe, ...]:
    """Read a JSONL file of ``{"question", "answer", "aliases"}`` objects (other keys ignored)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"core-knowledge set not found at {path}")
    probes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            probes.append(
                Probe(question=row["question"], answer=row["answer"], aliases=tuple(row.get("aliases") or ()))
            )
        except (ValueError, KeyError, TypeError, EventValidationError) as exc:
            raise ValueError(f"{path}:{number}: not a question row: {exc}") from exc
    return tuple(probes)


class KeptQuestions(Protocol):
    """Remembers which questions of a set a base answers correctly."""

    def get(self, key: str) -> list[str] | None: ...

    def put(self, key: str, questions: list[str]) -> None: ...


class MemoryKeptQuestions:
    def __init__(self) -> None:
        self._data: dict[str, list[str]] = {}

    def get(self, key: str) -> list[str] | None:
        return self._data.get(key)

    def put(self, key: str, questions: list[str]) -> None:
        self._data[key] = list(questions)


class ObjectStoreKeptQuestions:
    """Kept questions as small JSON objects beside the adapters; errors only cost a recomputation."""

    def __init__(self, client: object, bucket: str):
        self.client = client
        self.bucket = bucket

    def _key(self, key: str) -> str:
        return f"{CORE_CACHE_PREFIX}/{key}.json"

    def get(self, key: str) -> list[str] | None:
        try:
            response = self.client.get_object(self.bucket, self._key(key))  # type: ignore[attr-defined]
            try:
                data = json.loads(response.read())
            finally:
                response.close()
                response.release_conn()
            return [str(q) for q in data["questions"]]
        except Exception as exc:  # noqa: BLE001 - absent or unreadable: recompute
            log.debug("no stored core filter %s: %s", key, exc)
            return None

    def put(self, key: str, questions: list[str]) -> None:
        body = json.dumps({"questions": questions}).encode()
        try:
            self.client.put_object(  # type: ignore[attr-defined]
                self.bucket, self._key(key), io.BytesIO(body), len(body), content_type="application/json"
            )
        except Exception as exc:  # noqa: BLE001 - only a cache
            log.warning("could not store the core filter %s: %s", key, exc)


class LayeredKeptQuestions:
    """Memory first, then a slower store behind it."""

    def __init__(self, *layers: KeptQuestions):
        self.layers = layers

    def get(self, key: str) -> list[str] | None:
        for i, layer in enumerate(self.layers):
            found = layer.get(key)
            if found is not None:
                for earlier in self.layers[:i]:
                    earlier.put(key, found)
                return found
        return None

    def put(self, key: str, questions: list[str]) -> None:
        for layer in self.layers:
            layer.put(key, questions)


def needs_filter(mode: str, model_name: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return model_name != DEFAULT_MODEL


def core_set_for_base(
    questions: Sequence[Probe],
    *,
    model_name: str,
    mode: str,
    cache_key: str,
    kept: KeptQuestions,
    score_base: Callable[[Sequence[Probe]], ClosedBookResult],
) -> tuple[Probe, ...]:
    """The core-knowledge questions this base answers correctly (or all of them, see ``mode``)."""
    if not needs_filter(mode, model_name):
        return tuple(questions)
    remembered = kept.get(cache_key)
    if remembered is None:
        result = score_base(questions)
        remembered = [item.question for item in result.items if item.correct]
        kept.put(cache_key, remembered)
        log.info("core knowledge for %s: base answers %d of %d", model_name, len(remembered), len(questions))
    keep = set(remembered)
    return tuple(p for p in questions if p.question in keep)
