"""How much of a passage do its self-generated probes ask about? (what the regression gate can guard)

    python bench/probes.py --data ../shared/data/dev.jsonl --limits 5,8,10,12,15,20

The generator writes probes from a passage when the product sends none
(``GeneratorConfig.self_probe_count``, :func:`services.generator.probes.self_generated_probes`).
They are the reward's questions for that feedback and, in every later update to the scope,
the earlier-feedback set of the regression gate: a fact no probe asks about can be forgotten
without any gate seeing it. This counts, for each limit, how many probes the passages yield
and how many of the file's own (held-out, hand-written) questions a probe covers: same
answer, or one of its aliases, after the grader's normalisation
(:func:`shared.scoring.normalize_answer`). No model: it runs in a second. JSON and Markdown go to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.generator.asking import question_first  # noqa: E402
from services.generator.probes import _questions, self_generated_probes  # noqa: E402
from shared.events import Probe  # noqa: E402
from shared.scoring import normalize_answer  # noqa: E402

RESULTS = REPO / "bench" / "results"


def covered_questions(
    passage: str, title: str | None, answers: Sequence[tuple[str, Sequence[str]]], limit: int
) -> tuple[int, list[bool]]:
    """How many probes the generator writes at ``limit``, and for each (answer, aliases) of a
    held-out question whether one of them asks for it."""
    written = self_generated_probes(passage, title, limit)
    return len(written), _hits(written, answers)


def question_first_forms(
    passage: str, title: str | None, answers: Sequence[tuple[str, Sequence[str]]], limit: int
) -> tuple[int, list[bool]]:
    """Of the probes written at ``limit``, how many can also be asked question-first
    (:func:`services.generator.asking.question_first`: a wording the trainer does not train with
    ``question_first`` off, so a regression set of them would be held out), and which held-out
    questions those ask for."""
    written = self_generated_probes(passage, title, limit)
    subject, asked = _questions(passage, title)
    where = {probe.question: (sentence, blank) for _, sentence, blank, probe in asked}
    askable = [p for p in written if p.question in where and question_first(*where[p.question], subject)]
    return len(askable), _hits(askable, answers)


def _hits(probes: Sequence[Probe], answers: Sequence[tuple[str, Sequence[str]]]) -> list[bool]:
    asked = {normalize_answer(a) for p in probes for a in (p.answer, *p.aliases)}
    return [bool(asked & {normalize_answer(a) for a in (answer, *aliases)}) for answer, aliases in answers]


def coverage(rows: list[dict], limit: int) -> dict:
    """Probes written and held-out questions whose answer a probe asks for, at ``limit`` probes a passage."""
    probes = covered = questions = first = covered_first = 0
    for row in rows:
        answers = [(q["answer"], q.get("aliases", ())) for q in row["questions"]]
        written, hits = covered_questions(row["passage"], row.get("title"), answers, limit)
        askable, first_hits = question_first_forms(row["passage"], row.get("title"), answers, limit)
        probes += written
        covered += sum(hits)
        questions += len(hits)
        first += askable
        covered_first += sum(first_hits)
    return {"limit": limit, "probes": probes, "per_passage": probes / len(rows), "covered": covered, "questions": questions,
            "question_first": first, "covered_question_first": covered_first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="passages with questions (dev.jsonl format)")
    parser.add_argument("--limits", default="5,8,10,12,15,20", help="self_probe_count values to count at")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    limits = [int(x) for x in args.limits.split(",")]
    table = [coverage(rows, limit) for limit in limits]
    lines = [
        f"Self-generated probes on `{args.data}` ({len(rows)} passages), {time.strftime('%Y-%m-%d')}.",
        "",
        "| self_probe_count | probes (per passage) | held-out questions whose answer a probe asks | probes that can be asked question-first | held-out questions those ask |",
        "|---|---|---|---|---|",
        *(f"| {t['limit']} | {t['probes']} ({t['per_passage']:.1f}) | {t['covered']}/{t['questions']} "
          f"({100 * t['covered'] / t['questions']:.0f}%) | {t['question_first']} | {t['covered_question_first']} |" for t in table),
    ]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"probes-{stamp}.md").write_text(text)
    (RESULTS / f"probes-{stamp}.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": table}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
