"""Generator: probe questions written from the passage when the product sends none."""

from __future__ import annotations

import json
import re

from services.generator.candidates import probes_for
from services.generator.probes import self_generated_probes
from services.generator.settings import GeneratorConfig
from shared.events import FeedbackSubmitted, KnowledgeFeedback, Probe

QUELLMOOR = (
    "Quellmoor is a market town on the eastern bank of the Sallow Brenn, a river in the upland province of "
    "Tarrowdene. It received its market charter in 1387 from Duke Aldric Venmoor, who hoped to draw the wool "
    "trade away from the coast. The most recent census recorded a population of 6,412. A narrow-gauge railway "
    "linked the town to the provincial capital, Dray Harwick, in 1891. The local grammar school, founded by "
    "the merchant Ottilie Brask, still occupies its original timber hall."
)


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def test_probes_are_grounded_closed_book_questions() -> None:
    probes = self_generated_probes(QUELLMOOR, "Quellmoor", limit=5)
    assert len(probes) == 5  # one per sentence that holds a fact to ask about
    for probe in probes:
        assert probe.source == "self_generated"
        assert probe.question.endswith("?")
        assert "Quellmoor" in probe.question  # makes sense without the passage
        assert norm(probe.answer) in norm(QUELLMOOR)
        assert norm(probe.answer) not in norm(probe.question)
    by_answer = {p.answer: p for p in probes}
    assert by_answer["1387"].question == "Quellmoor received its market charter in what year from Duke Aldric Venmoor?"
    assert by_answer["6,412"].aliases == ("6412",)
    assert "which merchant" in by_answer["Ottilie Brask"].question
    assert "Brask" in by_answer["Ottilie Brask"].aliases


def test_limit_and_empty_passages() -> None:
    assert len(self_generated_probes(QUELLMOOR, "Quellmoor", limit=2)) == 2
    assert self_generated_probes(QUELLMOOR, "Quellmoor", limit=0) == ()
    assert self_generated_probes("nothing to ask about here at all.", None) == ()


def test_past_one_per_sentence_the_other_facts_of_the_sentences() -> None:
    first = self_generated_probes(QUELLMOOR, "Quellmoor", limit=5)
    more = self_generated_probes(QUELLMOOR, "Quellmoor", limit=9)
    assert 5 < len(more) <= 9
    assert set(first) <= set(more)  # the one-per-sentence choice comes first, unchanged
    assert len({p.answer.lower() for p in more}) == len(more)  # each fact asked once
    assert len({p.question for p in more}) == len(more)
    for probe in more:
        assert norm(probe.answer) in norm(QUELLMOOR) and norm(probe.answer) not in norm(probe.question)
    assert {"Aldric Venmoor", "1891"} <= {p.answer for p in set(more) - set(first)}  # second facts of sentences
    # no more facts than the passage has: a larger limit stops there
    assert len(self_generated_probes(QUELLMOOR, "Quellmoor", limit=20)) < 20


def test_subject_comes_from_the_passage_without_a_title() -> None:
    probes = self_generated_probes(QUELLMOOR, None, limit=5)
    assert probes and all("Quellmoor" in p.question for p in probes)


def test_product_probes_win_and_self_generated_fill_in() -> None:
    own = Probe(question="In which year was Quellmoor granted its charter?", answer="1387")
    with_probes = FeedbackSubmitted(
        feedback_id="fb-p", scope="acme", content=KnowledgeFeedback(passage=QUELLMOOR, probes=(own,))
    )
    assert probes_for(with_probes, GeneratorConfig()) == (own,)
    without = FeedbackSubmitted(feedback_id="fb-q", scope="acme", content=KnowledgeFeedback(passage=QUELLMOOR))
    made = probes_for(without, GeneratorConfig(self_probe_count=3))
    assert len(made) == 3 and {p.source for p in made} == {"self_generated"}


def test_on_the_evaluation_passages(shared_data) -> None:
    """Every passage yields probes whose answers are in it; many match the gold questions' answers."""
    rows = [json.loads(line) for line in (shared_data / "dev.jsonl").read_text().splitlines() if line.strip()]
    matched = total = 0
    for row in rows:
        probes = self_generated_probes(row["passage"], row["title"], limit=5)
        assert 3 <= len(probes) <= 5, row["id"]
        mine = set()
        for probe in probes:
            assert norm(probe.answer) in norm(row["passage"]), (row["id"], probe)
            assert norm(probe.answer) not in norm(probe.question), (row["id"], probe)
            assert len(probe.question) < 400
            mine |= {norm(a) for a in (probe.answer, *probe.aliases)}
        for gold in row["questions"]:
            total += 1
            matched += bool(mine & {norm(a) for a in (gold["answer"], *gold["aliases"])})
    # The gold questions were written by hand; 5 extracted probes per passage hit
    # 88 of their 200 answers (measured: bench/probes.py); anything far below means extraction broke.
    assert matched / total >= 0.35, (matched, total)


def test_grounded_pairs_ask_every_fact_answer_with_its_sentence_and_hold_out_the_probes() -> None:
    from services.generator.probes import grounded_pairs

    probes = self_generated_probes(QUELLMOOR, "Quellmoor", limit=5)
    pairs = grounded_pairs(QUELLMOOR, "Quellmoor", probes)
    asked = {p.question for p in pairs}
    assert not asked & {p.question for p in probes}  # the reward is not measured on trained pairs
    assert len(pairs) >= 3  # the other facts of the probes' sentences
    every = {p.question for p in grounded_pairs(QUELLMOOR, "Quellmoor")}
    assert every >= asked | {p.question for p in probes}
    by_answer: dict[str, object] = {}
    for pair in pairs:
        by_answer.setdefault(pair.answer, pair)  # the cloze form comes first, its question-first form after
    duke = by_answer["Aldric Venmoor"]
    assert duke.question == "Quellmoor received its market charter in 1387 from which duke?"
    # The answer is the sentence, named: "It received ..." would not stand alone.
    assert duke.sentence.startswith("Quellmoor received its market charter in 1387 from Duke Aldric Venmoor")
    for pair in pairs:
        assert norm(pair.answer) in norm(pair.sentence) and norm(pair.answer) not in norm(pair.question)
    assert len(grounded_pairs(QUELLMOOR, "Quellmoor", limit=2)) == 2


def test_every_candidate_of_a_passage_carries_the_grounded_pairs() -> None:
    from services.generator.candidates import grounded_sequences

    event = FeedbackSubmitted(
        feedback_id="fb-1", scope="s", content=KnowledgeFeedback(title="Quellmoor", passage=QUELLMOOR), submitted_by="t"
    )
    probes = probes_for(event, GeneratorConfig())
    sequences = grounded_sequences(event, probes, GeneratorConfig())
    assert sequences and all(s.startswith("Question: ") and "\nAnswer: " in s for s in sequences)
    assert grounded_sequences(event, probes, GeneratorConfig(grounded_pairs=0)) == []
    # Self-generated probes are trained on; a product's own probes stay held out.
    assert any(p.question in s for p in probes for s in sequences)
    product = tuple(p.model_copy(update={"source": "product"}) for p in probes)
    assert not any(p.question in s for p in product for s in grounded_sequences(event, product, GeneratorConfig()))


def test_passive_facts_are_also_asked_question_first() -> None:
    """A fact the passage states in the passive is trained in the shape a person asks it too."""
    from services.generator.probes import grounded_pairs

    asked = {p.question: p for p in grounded_pairs(QUELLMOOR, "Quellmoor", ask_first="also")}
    first = asked["Which merchant founded Quellmoor's local grammar school?"]
    assert first.answer == "Ottilie Brask" and first.sentence.startswith("The local grammar school, founded by")
    # answered by the span alone; a cloze question by the sentence
    assert first.reply == "Ottilie Brask."
    assert all(p.reply == p.sentence for p in grounded_pairs(QUELLMOOR, "Quellmoor"))
    # the cloze form stays beside it
    assert any("founded by which merchant" in q for q in asked)

    species = (
        "The marsh tindlewren is a small songbird of the reed beds around Lake Ouvrenne. The species was first "
        "described in 1874 by the naturalist Heddwin Carrow, who collected specimens there. It is now protected "
        "within the Greyhollow Wetland Reserve, established in 1967. A monastery in the Kalveth Highlands, "
        "founded in 1104 by the abbot Serenus of Lume, stands above it."
    )
    questions = {p.question for p in grounded_pairs(species, "Marsh tindlewren", ask_first="also")}
    assert "Which naturalist first described Marsh tindlewren?" in questions  # "the species" is the subject
    assert "In what year was Marsh tindlewren first described?" in questions
    assert "In what year was the Greyhollow Wetland Reserve established?" in questions
    # the participle speaks of the monastery, not of the Highlands the preposition names
    assert not any("founded the Kalveth Highlands" in q or "was the Kalveth Highlands" in q for q in questions)

    firm = (
        "Velliver Instruments was a maker of surveying equipment founded in 1902 in the port city of Saint Orlac. "
        "Sales fell in the 1960s, and in 1974 the firm was acquired by the optics group Hallenbrook Ltd."
    )
    questions = {p.question for p in grounded_pairs(firm, "Velliver Instruments", ask_first="also")}
    assert {
        "In what year was Velliver Instruments founded?",
        "In what year was Velliver Instruments acquired?",
        "Which optics group acquired Velliver Instruments?",
    } <= questions
    for pair in grounded_pairs(firm, "Velliver Instruments", ask_first="also"):
        assert norm(pair.answer) not in norm(pair.question)


def test_the_question_first_forms_are_off_unless_the_setting_asks_for_them_beside_or_instead() -> None:
    from services.generator.candidates import grounded_sequences

    event = FeedbackSubmitted(
        feedback_id="fb-1", scope="s", content=KnowledgeFeedback(title="Quellmoor", passage=QUELLMOOR), submitted_by="t"
    )
    probes = probes_for(event, GeneratorConfig())
    first = "Question: Which merchant founded Quellmoor's local grammar school?\n"
    plain = grounded_sequences(event, probes, GeneratorConfig())
    both = grounded_sequences(event, probes, GeneratorConfig(question_first="also"))
    assert not any(s.startswith(first) for s in plain)
    assert any(s.startswith(first) for s in both) and set(plain) < set(both)
    # "instead": the question-first form takes its cloze question's place; a fact with no form keeps its
    # cloze question, so there are as many pairs as without the forms
    only = grounded_sequences(event, probes, GeneratorConfig(question_first="instead"))
    assert first + "Answer: Ottilie Brask." in only
    assert len(only) == len(plain)
    assert not any("founded by which merchant" in s for s in only)
    assert set(only) - set(plain) == set(both) - set(plain)
    assert set(only) & set(plain) and set(only) < set(both)


def test_active_past_tense_facts_are_asked_with_did_and_the_base_form() -> None:
    from services.generator.asking import question_first
    from services.generator.probes import _questions

    subject, asked = _questions(QUELLMOOR, "Quellmoor")
    by_answer = {blank.answer: question_first(sentence, blank, subject) for _, sentence, blank, _ in asked}
    assert by_answer["1387"] == "In what year did Quellmoor receive its market charter?"
    assert by_answer["Aldric Venmoor"] == "From which duke did Quellmoor receive its market charter?"
    assert by_answer["Dray Harwick"] == "To which provincial capital did a narrow-gauge railway link Quellmoor?"
    assert by_answer["Ottilie Brask"] == "Which merchant founded Quellmoor's local grammar school?"

    def first_forms(passage: str, title: str) -> set[str]:
        subject, asked = _questions(passage, title)
        return {q for _, sentence, blank, _ in asked if (q := question_first(sentence, blank, subject))}

    # No form where the clause is not "<noun phrase> <past-tense verb> ...": a passive with "was"
    # taken for an active verb, an adjective in -ed, a second clause.
    assert first_forms(
        "The Stellwick clock stands in the square. The clock was damaged by lightning in 1744 and rebuilt. "
        "The largest recorded performance took place in 1951 before the mayor.",
        "Stellwick clock",
    ) == set()
    # the year that starts a second clause ("and again in 1949") gets none
    assert first_forms(
        "Grindlemoor Rovers is a football club in the mill town of Grindlemoor. "
        "The team won the Ostwold Cup in 1907 and again in 1949 in front of large crowds.",
        "Grindlemoor Rovers",
    ) == {"In what year did Grindlemoor Rovers win the Ostwold Cup?"}
    firm = "Velliver Instruments made theodolites. In 1928 the firm moved its works to Gannet Lane, where it grew."
    assert first_forms(firm, "Velliver Instruments") == {"In what year did Velliver Instruments move its works to Gannet Lane?"}
