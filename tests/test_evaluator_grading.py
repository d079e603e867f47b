"""The grading rules of shared.scoring on hand-written cases."""

from __future__ import annotations

import pytest

from shared.events import Probe
from shared.scoring import (
    contains_answer,
    exact_match,
    first_line,
    grade,
    grade_answers,
    normalize_answer,
    probe_set_digest,
    token_f1,
    weighted_target,
)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Nile", "nile"),
        ("  A   green  heron. ", "green heron"),
        ("Chandler's Arch!", "chandlers arch"),
        ("Chandler\u2019s Arch", "chandlers arch"),
        ("6,412", "6412"),
        ("1,000,000 people", "1000000 people"),
        ("3.5 metres.", "3.5 metres"),
        ("Seven", "7"),
        ("An apple", "apple"),
        ("theatre", "theatre"),  # articles are whole words only
        ("", ""),
        ("A", "a"),  # an article alone is the answer (a grade, a blood type): it stays
        ("The.", "the"),
        ("...", ""),
    ],
)
def test_normalisation(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "answer", "aliases", "correct"),
    [
        ("Paris", "Paris", (), True),
        ("paris.", "Paris", (), True),
        ("The capital of France is Paris.", "Paris", (), True),  # containment
        ("Parisian cafes", "Paris", (), False),  # whole words only
        ("6412", "6,412", (), True),
        ("The census recorded 6,412 people.", "6,412", ("6412",), True),
        ("64120", "6,412", ("6412",), False),
        ("13870", "1387", (), False),
        ("In 1387.", "1387", (), True),
        ("Venmoor", "Aldric Venmoor", ("Duke Aldric Venmoor", "Venmoor"), True),  # alias
        ("Duke Aldric Venmoor granted it", "Aldric Venmoor", (), True),
        ("Aldric", "Aldric Venmoor", (), False),  # a part is not the answer
        ("a heron", "green heron", ("a green heron", "heron"), True),
        ("a blue heron", "green heron", (), False),
        ("seven", "7", (), True),
        ("It has 7 gates", "seven", (), True),
        ("3.5", "35", (), False),  # decimal points are kept
        ("A", "A", (), True),  # a grade: an article alone, compared as it is
        ("A.", "A", (), True),
        ("B", "A", (), False),
        ("She got a B", "A", (), False),  # an article-only answer is matched whole, never found inside
        ("Blood type A", "A", (), False),  # (the judge, where there is one, may rescue such an answer)
        ("", "Paris", (), False),
        ("...", "...", (), False),  # a reference that normalises to nothing matches nothing
        ("The Nile", "The", (), False),  # an article-only reference is not found inside a longer answer
    ],
)
def test_grade(prediction: str, answer: str, aliases: tuple[str, ...], correct: bool) -> None:
    assert grade(prediction, answer, aliases).correct is correct


def test_exact_and_containment_are_told_apart() -> None:
    assert exact_match("The Nile.", "Nile") and contains_answer("The Nile.", "Nile")
    assert not exact_match("It is the Nile", "Nile") and contains_answer("It is the Nile", "Nile")
    result = grade("It is the River Nile", "Nile", ("River Nile",))
    assert result.correct and result.contained and not result.exact
    assert result.matched == "Nile"


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("green heron", "green heron", 1.0),
        ("the green heron", "a green heron", 1.0),
        ("green", "green heron", 2 * (1.0 * 0.5) / 1.5),
        ("blue bird", "green heron", 0.0),
        ("", "", 1.0),
        ("", "heron", 0.0),
    ],
)
def test_token_f1(prediction: str, reference: str, f1: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_f1_takes_the_best_reference() -> None:
    assert grade("Venmoor", "Aldric Venmoor", ("Venmoor",)).f1 == 1.0
    assert grade("Venmoor", "Aldric Venmoor").f1 == pytest.approx(2 / 3)


def test_first_line_keeps_a_short_answer() -> None:
    assert first_line("\n  Paris.\nIt is also known as...") == "Paris."
    assert first_line("   ") == ""


def test_grade_answers_counts_and_the_judge_only_rescues() -> None:
    probes = [
        Probe(question="Capital of France?", answer="Paris"),
        Probe(question="Longest river in Africa?", answer="Nile"),
        Probe(question="Coldest continent?", answer="Antarctica"),
    ]
    predictions = ["Paris", "the Amazon", "the South Pole continent"]
    asked: list[str] = []

    def judge(question: str, prediction: str, refs: object) -> bool | None:
        asked.append(question)
        return True if "South Pole" in prediction else None

    plain = grade_answers(probes, predictions)
    assert (plain.correct, plain.total, plain.accuracy) == (1, 3, pytest.approx(1 / 3))
    judged = grade_answers(probes, predictions, judge)
    assert judged.correct == 2 and judged.items[2].judged and not judged.items[0].judged
    assert asked == ["Longest river in Africa?", "Coldest continent?"]  # right answers are never re-judged
    empty = grade_answers([], [])
    assert empty.accuracy is None and empty.mean_f1 is None


def test_product_probes_weigh_more_than_self_generated() -> None:
    assert weighted_target(1.0, 0.0) == pytest.approx(2 / 3)
    assert weighted_target(0.0, 1.0) == pytest.approx(1 / 3)
    assert weighted_target(None, 0.5) == 0.5
    assert weighted_target(0.25, None) == 0.25
    assert weighted_target(None, None) is None
    assert weighted_target(1.0, 0.0, product_weight=3.0) == pytest.approx(0.75)


def test_probe_set_digest_depends_on_content_and_settings() -> None:
    a = [Probe(question="Q?", answer="A", aliases=("x", "y"))]
    b = [Probe(question="Q?", answer="A", aliases=("y", "x"))]
    assert probe_set_digest(a) == probe_set_digest(b)
    assert probe_set_digest(a) != probe_set_digest(a, max_new_tokens=8)
    assert probe_set_digest(a) != probe_set_digest([Probe(question="Q?", answer="B")])


def test_a_measurement_the_judge_did_not_answer_for_is_not_remembered(monkeypatch) -> None:
    """Graded by the rules alone while the judge was down: remembered, it would be compared later
    with measurements the judge helped (a parent measured in an outage, its candidates after)."""
    from contextlib import contextmanager

    from services.evaluator import measurement
    from services.evaluator.measurement import Measurer, ScoreCache
    from shared.events import Probe

    class Slot:
        @contextmanager
        def serving(self, directory: object):
            yield None

    monkeypatch.setattr(measurement, "closed_book_answers", lambda lm, questions, **kw: ["the big one"] * len(questions))
    probes = [Probe(question="Longest river in Africa?", answer="Nile")]
    verdicts: list[bool | None] = [None, True]

    def judge(question: str, prediction: str, references: object) -> bool | None:
        return verdicts.pop(0)

    measurer = Measurer(Slot(), ScoreCache(), max_new_tokens=8, batch_size=4, judge=judge, judge_identity="grader")  # type: ignore[arg-type]
    down = measurer.measure("base", lambda: None, {"target": probes})
    assert down["target"].correct == 0 and len(measurer.cache) == 0
    back = measurer.measure("base", lambda: None, {"target": probes})  # asked again, not read from the cache
    assert back["target"].correct == 1 and len(measurer.cache) == 1
