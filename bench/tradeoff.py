"""Learning against forgetting: the same updates trained under several settings.

    python bench/tradeoff.py --data ../shared/data/dev.jsonl --limit 10 \\
        --setting default= --setting kl3=kl_weight=3 --setting r8=lora_rank=8,lora_alpha=16 \\
        --scales 1,0.5 --workers 2

For each passage and each setting it trains one update on the rule-written part
of the generator's candidates (a question about each fact of the passage,
answered by the sentence that states it, plus the passage itself; no
model-written self-edit), so the data is the same for every setting and only
the training differs. It then asks the passage's closed-book questions and the
evaluator's core-knowledge questions at each adapter strength of ``--scales``
(the generator's strength ladder). What the knowledge benchmark calls the
platform's cost, the core drop, is what a setting trades for what it teaches;
this finds where the trainer's defaults should sit on that curve.

A setting is ``NAME=KEY=VALUE,KEY=VALUE``. Keys: the training directives
(``learning_rate``, ``epochs``, ``lora_rank``, ``lora_alpha``, ``batch_size``,
``target_modules``: all-linear, attention or mlp), the rehearsal
(``kl_weight``, ``kl_batch``, ``rehearsal_count``; weight 0 turns it off) and
``data``: ``platform`` (default), ``passage`` (the passage alone, no
rehearsal: the knowledge benchmark's baseline) or ``gold`` (the gold pairs).
Unset keys take the platform's defaults (``ScopePolicy.default_directives``,
``TrainerConfig``).

Settings run in ``--workers`` processes, each with its own copy of the model:
on a GPU, where one small model leaves the card mostly idle, that multiplies
what a run measures. Results go under ``bench/results/`` as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.evaluator.core_knowledge import load_question_set  # noqa: E402
from services.evaluator.settings import PACKAGED_CORE_SET as CORE  # noqa: E402
from shared.events import Probe, TrainingDirectives  # noqa: E402

RESULTS = REPO / "bench" / "results"
DIRECTIVE_KEYS = {"learning_rate", "epochs", "lora_rank", "lora_alpha", "batch_size", "target_modules"}
OTHER_KEYS = {"kl_weight", "kl_batch", "rehearsal_count", "data"}
DATA_KINDS = ("platform", "passage", "gold")


@dataclass(frozen=True)
class Setting:
    name: str
    values: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> "Setting":
        name, _, rest = text.partition("=")
        if not name:
            raise ValueError(f"a setting needs a name: {text!r}")
        values = {}
        for part in filter(None, rest.split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in DIRECTIVE_KEYS | OTHER_KEYS:
                raise ValueError(f"setting {name}: unknown or valueless key in {part!r}")
            values[key] = value
        if values.get("data", "platform") not in DATA_KINDS:
            raise ValueError(f"setting {name}: data is one of {', '.join(DATA_KINDS)}")
        return cls(name, values)

    def directives(self) -> TrainingDirectives:
        from shared.registry_view import ScopePolicy

        base = ScopePolicy().default_directives
        update = {k: v for k, v in self.values.items() if k in DIRECTIVE_KEYS}
        return TrainingDirectives.model_validate(base.model_dump() | update)


@dataclass
class Row:
    setting: str
    passage: str
    scale: float
    right: int
    questions: int
    core_right: int
    core_lost: int  # of the questions the base answers right
    core_gained: int
    train_seconds: float
    rehearsal_kl: float | None


def questions_of(row: dict) -> list[Probe]:
    return [Probe(question=q["question"], answer=q["answer"], aliases=tuple(q.get("aliases", ()))) for q in row["questions"]]


def load_passages(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit]


def training_data(setting: Setting, row: dict) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(texts, pairs) of one passage's update, as the trainer would receive them."""
    from services.generator.candidates import kept_sequences, passage_chunk_chars
    from services.generator.settings import GeneratorConfig
    from services.trainer.examples import split_question_answers
    from shared import events as ev
    from shared.registry_view import ScopePolicy

    kind = setting.values.get("data", "platform")
    if kind == "passage":
        return (row["passage"],), ()
    if kind == "gold":
        return (), tuple((q["question"], q["answer"]) for q in row["questions"])
    feedback = ev.FeedbackSubmitted(
        feedback_id=ev.new_id(), scope="tradeoff",
        content=ev.KnowledgeFeedback(title=row.get("title") or row["id"], passage=row["passage"]), submitted_by="bench",
    )
    config = GeneratorConfig()
    return split_question_answers(kept_sequences(feedback, (), config, passage_chunk_chars(config, ScopePolicy())))


_LOADED: dict[str, object] = {}  # per worker process: the model and the base's core answers, once


def run_setting(task: tuple[Setting, list[dict], list[float], str, str, str, int]) -> list[Row]:
    setting, passages, scales, model, device, dtype, threads = task
    import torch

    from services.trainer.lora_training import Anchoring, LoraTrainer, TrainingJob
    from services.trainer.rehearsal import Rehearsal, packaged_prompts
    from services.trainer.settings import TrainerConfig
    from shared.lora import scale_update
    from shared.models import load_model
    from shared.scoring import closed_book_accuracy
    from shared.settings import ModelSettings

    torch.set_num_threads(threads)
    if not _LOADED:
        _LOADED["lm"] = lm = load_model(ModelSettings(name=model, device=device, dtype=dtype))
        _LOADED["core"] = core = load_question_set(CORE)
        _LOADED["base_core"] = closed_book_accuracy(lm, core).items
    lm, core, base_core = _LOADED["lm"], _LOADED["core"], _LOADED["base_core"]
    defaults = TrainerConfig()
    kind = setting.values.get("data", "platform")
    weight = float(setting.values.get("kl_weight", defaults.rehearsal_weight))
    anchoring = Anchoring(weight=weight, batch=int(setting.values.get("kl_batch", defaults.rehearsal_batch)))
    count = int(setting.values.get("rehearsal_count", defaults.rehearsal_pairs))
    rehearsal = Rehearsal(packaged_prompts(), count)
    trainer = LoraTrainer(lm, Path(tempfile.mkdtemp(prefix="seal-tradeoff-")), rehearsal=rehearsal, anchoring=anchoring)
    directives = setting.directives()
    rows: list[Row] = []
    for row in passages:
        texts, pairs = training_data(setting, row)
        job = TrainingJob(
            adapter_id=f"{setting.name}-{row['id']}", directives=directives, texts=texts, pairs=pairs,
            rehearse=kind == "platform" and weight > 0,
        )
        started = time.monotonic()
        trained = trainer.train(job)
        seconds = time.monotonic() - started
        questions = questions_of(row)
        for scale in scales:
            folder = trained.directory.with_name(f"{trained.directory.name}-x{scale}")
            shutil.copytree(trained.directory, folder)
            scale_update(folder, scale)
            trainer.host.load("probe", folder)
            trainer.host.activate("probe")
            try:
                right = closed_book_accuracy(lm, questions).correct
                after = closed_book_accuracy(lm, core).items
            finally:
                trainer.host.remove("probe")
            lost = sum(b.correct and not a.correct for b, a in zip(base_core, after, strict=True))
            gained = sum(a.correct and not b.correct for b, a in zip(base_core, after, strict=True))
            rows.append(Row(
                setting.name, row["id"], scale, right, len(questions), sum(a.correct for a in after), lost, gained,
                round(seconds, 1), trained.rehearsal_kl,
            ))
            print(json.dumps(asdict(rows[-1])), flush=True)
    return rows


def summary(rows: list[Row], base_core: int, core_total: int, base_right: int, questions: int) -> str:
    lines = [
        "| setting | strength | correct | accuracy | core kept (mean) | core drop (points) | lost of base's right (mean) | train s |",
        "|---|---|---|---|---|---|---|---|",
        f"| no update | - | {base_right}/{questions} | {100 * base_right / questions:.1f}% | {base_core}/{core_total} | 0.0 | 0 | - |",
    ]
    groups: dict[tuple[str, float], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.setting, r.scale), []).append(r)
    for (name, scale), group in groups.items():
        right = sum(r.right for r in group)
        total = sum(r.questions for r in group)
        core_mean = sum(r.core_right for r in group) / len(group)
        lost = sum(r.core_lost for r in group) / len(group)
        secs = sum(r.train_seconds for r in group) / len(group)
        lines.append(
            f"| {name} | {scale:g} | {right}/{total} | {100 * right / total:.1f}% | {core_mean:.1f}/{core_total} | "
            f"{100 * (base_core - core_mean) / core_total:.1f} | {lost:.1f} | {secs:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="passages with questions (dev.jsonl format)")
    parser.add_argument("--limit", type=int, default=10, help="first N passages")
    parser.add_argument("--setting", action="append", default=[], help="NAME=KEY=VALUE,... (repeat); default: the platform's")
    parser.add_argument("--scales", default="1", help="adapter strengths to measure, e.g. 1,0.5")
    parser.add_argument("--workers", type=int, default=1, help="settings trained at once, one process each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                        help="float32 (default) matches the CPU services; auto is bfloat16 on a GPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        settings = [Setting.parse(s) for s in args.setting] or [Setting("default", {})]
        for s in settings:
            s.directives()
        scales = [float(x) for x in args.scales.split(",")]
        if not all(0 < s <= 1 for s in scales):
            raise ValueError("--scales: each strength is in (0, 1]")
    except ValueError as exc:
        parser.error(str(exc))
    if len({s.name for s in settings}) != len(settings):
        parser.error("setting names must differ")
    passages = load_passages(args.data, args.limit)
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(1, args.workers))
    tasks = [(s, passages, scales, args.model, args.device, args.dtype, threads) for s in settings]
    started = time.monotonic()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=None) as pool:
            results = pool.map(run_setting, tasks, chunksize=1)
    else:
        results = [run_setting(t) for t in tasks]
    rows = [r for group in results for r in group]

    from shared.models import load_model
    from shared.scoring import closed_book_accuracy
    from shared.settings import ModelSettings

    lm = load_model(ModelSettings(name=args.model, device=args.device, dtype=args.dtype))
    core = load_question_set(CORE)
    base_core = closed_book_accuracy(lm, core).correct
    questions = [q for p in passages for q in questions_of(p)]
    base_right = closed_book_accuracy(lm, questions).correct
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {lm.device}"
    if lm.device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(lm.device)})"
    meta = {
        "data": str(args.data), "passages": len(passages), "questions": len(questions), "model": args.model,
        "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"), "machine": machine,
        "wall_seconds": round(time.monotonic() - started), "workers": args.workers,
        "settings": {s.name: s.values for s in settings},
    }
    table = (
        f"Learning against forgetting on `{args.data}` (first {len(passages)} passages, {len(questions)} questions), "
        f"model `{args.model}` in {args.dtype}, {meta['date']}, {machine}; {meta['wall_seconds']} s wall.\n\n"
        + summary(rows, base_core, len(core), base_right, len(questions))
        + "\nSettings: " + "; ".join(f"`{s.name}`: {s.values or 'the defaults'}" for s in settings) + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"tradeoff-{stamp}.md").write_text(table)
    (args.out / f"tradeoff-{stamp}.json").write_text(json.dumps(
        {"meta": meta, "base_core": base_core, "core_total": len(core), "base_right": base_right,
         "rows": [asdict(r) for r in rows]}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
