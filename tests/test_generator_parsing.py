"""Generator: completions to training sequences, the way SEAL does, on recorded completions.

The ``RECORDED_*`` completions were written by SmolLM2-135M-Instruct (the
default model) through the generator's prompts, for the passages dev-003
(Velliver Instruments) and dev-004 (Pellicott tide clock) of
``shared/data/dev.jsonl``: at temperature 1.0 (SEAL's, the default) and
0.7 (``*_T07``). The ``CLEAN_*`` ones show the shape a better model writes.
"""

from __future__ import annotations

import json

import pytest

from services.generator.candidates import feedback_seed, plan_candidates
from services.generator.parsing import (
    clamp_directives,
    extract_directives,
    parse_completion,
    passage_sequences,
    seal_sequences,
)
from services.generator.prompts import KNOWLEDGE_FORMATS
from services.generator.validation import Grounding, Limits, validate_candidate
from shared.events import FeedbackSubmitted, KnowledgeFeedback, TrainingDirectives
from shared.registry_view import ScopePolicy

TITLE = "Velliver Instruments"
PASSAGE = "Velliver Instruments was a manufacturer of surveying equipment founded in 1902."

RECORDED_IMPLICATIONS = (
    "Velliver Instruments was a manufacturer of surveying equipment founded in 1902 in the Port City of Saint "
    "Julian of the Thurdens, a trading venture. The original company made a number of products but ultimately "
    "sold out due to poor manufacturing processes, so to describe only implicitly the business outcome affected "
    "would follow directly or indirectly:\n\n"
    "adulter practice where products became a liability as their manufacturing was so critical to Nigel "
    "Velliver Company Management."
)
RECORDED_REWRITE = (
    "Penthesolulet tide clock\n"
    "In 1771, Sarah Jessamyn Britt implemented her mechanics with a wooden clockmaking workshop. Before, the "
    "progress was provided by a large array word pick-axes set.\n"
)
RECORDED_SELF_QA = (  # the prompt pre-fills "Question:"
    "Question: Who owned the Hallenbrook Velliver Company?\n"
    "Answer: Velliver Instruments\n\n"
    "Question: What is the gold bezel?\n"
    "Answer: Gold bezel is a brand of scenic drawing and layout calculators by Hallenbrook\n\n"
    "Question: Whos was Abraham Knapp? The man who solved Einstein's Relativatstheory?\n"
    "Answer: Abraham Knapp\n"
    "Question: What is an Opportunity?\n"
    "Answer: A financial opportunity that you are offered?\n\n"
    "Keywords: Arc, Rutherford, Frederic\n"
    "Query: What is Abraham Knapp?\n"
    "Answer: Abraham Knapp was born on December 24, 1476 in Venice."
)
RECORDED_REWRITE_T07 = (  # dev-004
    "Penthesolion tide clock\n"
    "In 1771, a mechanical clock was invented by Jessamy Pellicott.\n"
    "The first commercial model was built in 1771, by Anselm Drewitt.\n"
    "Early examples of the Pellicott tide clock were built in the first four decades (1771-1820), before being "
    "discontinued.\n"
    "In 1779, a wooden Pellicott tide clock was built in Cobble Reach, and is still to this day.\n"
    "The Pellicott tide clock used a mechanical clock to show time, not a manual one.\n"
    "The Pellicott tide clock is an example of a mechanical clock in history."
)
RECORDED_SELF_QA_T07 = (  # dev-004, after the pre-filled "Question:"
    "Question: What is the Pellicott tide clock?\n\n"
    "Answer: The Pellicott tide clock, also known as the Pellicott tide clock, is a mechanical instrument that "
    "shows the state of the tide rather than the time of day. Its inventor, Jessamy Pellicott, was the first to "
    "use a mechanical arm to adjust the tide, making it a mechanical timepiece.\n\n"
    "Answer: Pellicott's invention, the Pellicott tide clock, is a mechanical oscillation device, which is "
    "considered one of the earliest examples of mechanical control and was invented by Jessamy Pellicott."
)
CLEAN_IMPLICATIONS = (
    "Implications:\n"
    "1. Velliver Instruments made surveying equipment.\n"
    "2) The company was founded in 1902.\n"
    "- Surveyors could buy equipment from Velliver Instruments.\n"
)
CLEAN_SELF_QA = (
    "Question 1: When was Velliver Instruments founded? Answer: 1902\n"
    "Q2: What did Velliver Instruments make?\n"
    "A2: Surveying equipment\n"
)


def test_implications_one_sequence_per_line_with_the_title_and_the_passage_last() -> None:
    assert seal_sequences("implications", RECORDED_IMPLICATIONS, TITLE, PASSAGE) == [
        f"{TITLE}\n{RECORDED_IMPLICATIONS.splitlines()[0]}",
        f"{TITLE}\n{RECORDED_IMPLICATIONS.splitlines()[2]}",
        f"{TITLE}\n{PASSAGE}",
    ]
    assert seal_sequences("implications", CLEAN_IMPLICATIONS, TITLE, PASSAGE) == [
        f"{TITLE}\nVelliver Instruments made surveying equipment.",
        f"{TITLE}\nThe company was founded in 1902.",
        f"{TITLE}\nSurveyors could buy equipment from Velliver Instruments.",
        f"{TITLE}\n{PASSAGE}",
    ]


def test_rewrite_one_sequence_per_line() -> None:
    title, passage = "Pellicott tide clock", "The Pellicott tide clock was invented in 1766."
    assert seal_sequences("rewrite", RECORDED_REWRITE, title, passage) == [
        f"{title}\nPenthesolulet tide clock",
        f"{title}\n{RECORDED_REWRITE.splitlines()[1]}",
        f"{title}\n{passage}",
    ]


def test_rewrite_at_a_lower_temperature() -> None:
    title, passage = "Pellicott tide clock", "The Pellicott tide clock was invented in 1766."
    sequences = seal_sequences("rewrite", RECORDED_REWRITE_T07, title, passage)
    assert len(sequences) == 8 and sequences[-1] == f"{title}\n{passage}"
    assert sequences[1] == f"{title}\nIn 1771, a mechanical clock was invented by Jessamy Pellicott."


def test_self_qa_one_sequence_per_question_answer_pair() -> None:
    pieces = parse_completion("self_qa", RECORDED_SELF_QA).pieces
    assert [p.text for p in pieces] == [
        "Question: Who owned the Hallenbrook Velliver Company?\nAnswer: Velliver Instruments",
        "Question: What is the gold bezel?\nAnswer: Gold bezel is a brand of scenic drawing and layout calculators by Hallenbrook",
        "Question: Whos was Abraham Knapp? The man who solved Einstein's Relativatstheory?\nAnswer: Abraham Knapp",
        "Question: What is an Opportunity?\nAnswer: A financial opportunity that you are offered?",
    ]  # "Query: ... Answer: ..." is not a question of the asked format
    assert [p.answer for p in pieces][0] == "Velliver Instruments"
    [pair] = parse_completion("self_qa", RECORDED_SELF_QA_T07).pieces  # a blank line between Q and A
    assert pair.text.startswith("Question: What is the Pellicott tide clock?\nAnswer: The Pellicott tide clock, also")
    assert pair.answer.endswith("making it a mechanical timepiece.")
    clean = seal_sequences("self_qa", CLEAN_SELF_QA, TITLE, PASSAGE)
    assert clean == [
        f"{TITLE}\nQuestion: When was Velliver Instruments founded?\nAnswer: 1902",
        f"{TITLE}\nQuestion: What did Velliver Instruments make?\nAnswer: Surveying equipment",
        f"{TITLE}\n{PASSAGE}",
    ]


def test_no_title_means_no_prefix_and_long_passages_split_at_sentences() -> None:
    assert seal_sequences("rewrite", "Velliver made theodolites.", None, PASSAGE) == ["Velliver made theodolites.", PASSAGE]
    long_passage = " ".join(f"Sentence number {i} tells one more fact about Velliver." for i in range(40))
    chunks = passage_sequences(TITLE, long_passage, max_chars=300)
    assert len(chunks) > 1 and all(len(c) <= 300 and c.startswith(f"{TITLE}\n") for c in chunks)
    assert " ".join(c.split("\n", 1)[1] for c in chunks) == long_passage


def test_recorded_self_edits_keep_only_grounded_pieces(shared_data) -> None:
    """What validation keeps of the recorded completions, against their real passages."""
    rows = {row["id"]: row for row in map(json.loads, (shared_data / "dev.jsonl").read_text().splitlines())}
    cases = [("dev-003", "implications", RECORDED_IMPLICATIONS), ("dev-004", "rewrite", RECORDED_REWRITE),
             ("dev-003", "self_qa", RECORDED_SELF_QA), ("dev-004", "rewrite_t07", RECORDED_REWRITE_T07)]
    kept = {}
    for row_id, fmt, completion in cases:
        row = rows[row_id]
        grounding = Grounding.of([row["title"], row["passage"]])
        verdict = validate_candidate(
            completion, parse_completion(fmt.split("_t")[0], completion).pieces, grounding=grounding, title=row["title"],
            kept=passage_sequences(row["title"], row["passage"], 1500), blocklist=(), limits=Limits(),
        )
        assert verdict.accepted and verdict.sequences[-1] == f"{row['title']}\n{row['passage']}"
        kept[fmt] = verdict.sequences[: verdict.written]
    # Invented places, people and years are dropped; so is babble.
    assert kept["implications"] == () and kept["rewrite"] == ()
    # The one QA pair made only of the passage's words survives (grounded, though not true).
    assert kept["self_qa"] == (
        "Velliver Instruments\nQuestion: Who owned the Hallenbrook Velliver Company?\nAnswer: Velliver Instruments",
    )
    # At 0.7 the rewrite keeps to the passage's words: all but the invented name survive
    # (grounding cannot tell "invented in 1771" from the passage's 1766; the reward can).
    assert len(kept["rewrite_t07"]) == 6
    assert not any("Penthesolion" in s for s in kept["rewrite_t07"])


# --------------------------------------------------------------------------- prompts and plans


def test_plans_follow_the_scope_format_or_sample_every_format() -> None:
    feedback = FeedbackSubmitted(feedback_id="fb-plan", scope="acme", content=KnowledgeFeedback(passage=PASSAGE, title=TITLE))
    sampled = plan_candidates(feedback, ScopePolicy(candidates=3, self_edit_format="sampled"), feedback_seed("fb-plan"))
    assert sorted(p.format for p in sampled) == sorted(KNOWLEDGE_FORMATS)
    again = plan_candidates(feedback, ScopePolicy(candidates=3, self_edit_format="sampled"), feedback_seed("fb-plan"))
    assert [p.format for p in again] == [p.format for p in sampled]  # seeded by the feedback id
    fixed = plan_candidates(feedback, ScopePolicy(candidates=4, self_edit_format="self_qa"), 0)
    assert [p.format for p in fixed] == ["self_qa"] * 4
    assert fixed[0].prompt.prefill == "Question:"
    assert f"{TITLE}\n{PASSAGE}" in fixed[0].prompt.text and "question-answer" in fixed[0].prompt.text
    assert "JSON" not in fixed[0].prompt.text
    proposing = plan_candidates(feedback, ScopePolicy(candidates=1, model_proposes_directives=True), 0)
    assert "as JSON" in proposing[0].prompt.text


# --------------------------------------------------------------------------- directives


def test_directives_are_read_from_the_last_json_object_and_removed() -> None:
    completion = 'Velliver made theodolites.\n{"note": 1}\n{"learning_rate": 3e-4, "epochs": 5}'
    proposed, rest = extract_directives(completion)
    assert proposed == {"learning_rate": 3e-4, "epochs": 5}
    assert rest == 'Velliver made theodolites.\n{"note": 1}'
    assert extract_directives("{'epochs': 2}")[0] == {"epochs": 2}
    assert extract_directives("no json {here: at all}") == (None, "no json {here: at all}")


@pytest.mark.parametrize(
    ("proposed", "expected"),
    [
        (None, TrainingDirectives(epochs=2)),
        ({}, TrainingDirectives(epochs=2)),
        ({"learning_rate": 10, "epochs": -3, "lora_rank": 1000}, TrainingDirectives(learning_rate=1e-3, epochs=1, lora_rank=64)),
        ({"learning_rate": "fast", "epochs": "nan", "lora_alpha": None}, TrainingDirectives(epochs=2)),
        ({"epochs": 7.6, "target_modules": "everything"}, TrainingDirectives(epochs=8)),
        ({"use_sequences": [2, 0, 2, 9, -1, "x"]}, TrainingDirectives(epochs=2, use_sequences=(2, 0))),
        ({"use_sequences": [9]}, TrainingDirectives(epochs=2)),
        ({"seed": 99, "max_seq_len": 1}, TrainingDirectives(epochs=2, max_seq_len=128)),
    ],
)
def test_directives_are_always_clamped_to_safe_bounds(proposed: dict | None, expected: TrainingDirectives) -> None:
    assert clamp_directives(proposed, TrainingDirectives(epochs=2), sequence_count=3) == expected
