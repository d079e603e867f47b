"""Measuring a model (the base, or the base with one adapter) on named probe sets, with a cache.

Every candidate of one feedback has the same parent and the same probes, and
the parent's regression sets change only when the scope accepts something,
so the parent is measured once and its results are kept: keyed by *which
model* (base weights, adapter manifest digest) and *which probe set under
which scoring settings* (:func:`shared.scoring.probe_set_digest`). A
candidate's own results are kept the same way, so when it becomes the next
parent its core score is not asked again.

All questions of the sets that are not cached are asked in one batched
greedy pass through :func:`shared.scoring.closed_book_answers` and graded per
set with :func:`shared.scoring.grade_answers`: the one scoring function.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from services.evaluator.adapters import AdapterSlot
from shared.events import Probe
from shared.scoring import ClosedBookResult, Judge, closed_book_answers, grade_answers, probe_set_digest

log = logging.getLogger(__name__)


class ScoreCache:
    """A bounded, thread-safe LRU of results per (model key, probe-set digest)."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[str, str], ClosedBookResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, model_key: str, digest: str) -> ClosedBookResult | None:
        with self._lock:
            found = self._data.get((model_key, digest))
            if found is None:
                self.misses += 1
                return None
            self._data.move_to_end((model_key, digest))
            self.hits += 1
            return found

    def put(self, model_key: str, digest: str, result: ClosedBookResult) -> None:
        with self._lock:
            self._data[(model_key, digest)] = result
            self._data.move_to_end((model_key, digest))
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def base_model_key(base_sha256: str | None, model_name: str) -> str:
    return f"base:{base_sha256 or model_name}"


def adapter_model_key(base_sha256: str | None, model_name: str, manifest_sha256: str) -> str:
    return f"{base_model_key(base_sha256, model_name)}+adapter:{manifest_sha256}"


class Measurer:
    """Scores models on probe sets through one AdapterSlot, remembering what it measured."""

    def __init__(
        self,
        host: AdapterSlot,
        cache: ScoreCache,
        *,
        max_new_tokens: int,
        batch_size: int,
        judge: Judge | None = None,
        judge_identity: str | None = None,
    ):
        self.host = host
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.judge = judge
        self.settings = {
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "judge": judge_identity if judge is not None else None,
        }
        self.questions_asked = 0
        # Answers the judge gave no verdict on (down, paused), over the measurer's life: an
        # evaluation that sees it grow grades all its sides by the rules alone (handlers.py).
        self.judge_misses = 0
        # Set by stop(): a measurement in progress ends at its next token (shared.shutdown.Interrupted).
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Make a measurement that runs now, or starts later, end at its next generated token."""
        self.stopping.set()

    def digest(self, probes: Sequence[Probe]) -> str:
        return probe_set_digest(probes, **self.settings)

    def measure(
        self,
        model_key: str,
        adapter_dir: Callable[[], Path | None],
        sets: Mapping[str, Sequence[Probe]],
    ) -> dict[str, ClosedBookResult]:
        """Results per set name. ``adapter_dir`` is called only if something must be asked
        (None: the bare base model); it may raise UnusableAdapter."""
        results: dict[str, ClosedBookResult] = {}
        missing: dict[str, tuple[Sequence[Probe], str]] = {}
        for name, probes in sets.items():
            if not probes:
                results[name] = ClosedBookResult(())
                continue
            digest = self.digest(probes)
            cached = self.cache.get(model_key, digest)
            if cached is not None:
                results[name] = cached
            else:
                missing[name] = (probes, digest)
        if not missing:
            return results
        directory = adapter_dir()
        questions = [p.question for probes, _ in missing.values() for p in probes]
        with self.host.serving(directory) as lm:
            answers = closed_book_answers(
                lm, questions, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, stop=self.stopping
            )
        self.questions_asked += len(set(questions))
        log.info("measured %s on %d questions (%s)", model_key, len(set(questions)), ", ".join(missing))
        offset = 0
        for name, (probes, digest) in missing.items():
            misses = self.judge_misses
            result = grade_answers(probes, answers[offset : offset + len(probes)], self._counting_judge())
            offset += len(probes)
            if self.judge_misses != misses:
                # Graded by the rules alone where the judge did not answer (down, or paused): a
                # later measurement, with the judge back, must not be compared with this one.
                log.info("%s's %s not cached: the judge gave no verdict on %d answers", model_key, name, self.judge_misses - misses)
            else:
                self.cache.put(model_key, digest, result)
            results[name] = result
        return results

    def _counting_judge(self) -> Judge | None:
        """The judge, counting in ``judge_misses`` each answer it gave no verdict on."""
        judge = self.judge
        if judge is None:
            return None

        def asking(question: str, prediction: str, references: Sequence[str]) -> bool | None:
            verdict = judge(question, prediction, references)
            if verdict is None:
                self.judge_misses += 1
            return verdict

        return asking

    def remember(self, model_key: str, probes: Sequence[Probe], result: ClosedBookResult) -> None:
        """Seed the cache with a result measured elsewhere (e.g. while filtering the core set)."""
        self.cache.put(model_key, self.digest(probes), result)
