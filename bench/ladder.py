"""What a gentler rung of the strength ladder keeps of a scope's earlier updates.

    python bench/ladder.py --data ../shared/data/dev.jsonl --passages 3 --scales 0.75,0.5

Trains one scope's updates one after the other, as the platform does (each on the last, with
the trainer's rehearsal and the replay of the earlier updates' question-answer pairs; the data is
the rule-written part of the generator's candidates, as in ``bench/tradeoff.py``). After every
continuing update it makes each gentler rung of it two ways and asks every passage so far its
closed-book questions:

* ``whole``: the trained adapter's B matrices scaled (the trainer before 2026-11-27): the update
  and every earlier one carried in the adapter are scaled together;
* ``update``: each LoRA matrix moved that far from the parent's (``shared.lora.scale_update``
  with the parent): the earlier updates stay as they were.

The chain itself goes on from the full-strength update, so every row of one step starts from the
same parent. Results go under ``bench/results/`` as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tradeoff import Setting, load_passages, questions_of, training_data  # noqa: E402

RESULTS = REPO / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="passages with questions (dev.jsonl format)")
    parser.add_argument("--passages", type=int, default=3, help="how many updates, one passage each (default 3)")
    parser.add_argument("--scales", default="0.75,0.5", help="the gentler rungs to compare (default 0.75,0.5)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from services.trainer.lora_training import Anchoring, LoraTrainer, TrainingJob
    from services.trainer.rehearsal import Rehearsal, packaged_prompts
    from services.trainer.settings import TrainerConfig
    from shared.lora import scale_update
    from shared.models import load_model
    from shared.registry_view import ScopePolicy
    from shared.scoring import closed_book_accuracy
    from shared.settings import ModelSettings

    scales = [float(s) for s in args.scales.split(",") if s]
    passages = load_passages(args.data, args.passages)
    lm = load_model(ModelSettings(name=args.model, device=args.device, dtype=args.dtype))
    defaults = TrainerConfig()
    work = Path(tempfile.mkdtemp(prefix="seal-ladder-"))
    trainer = LoraTrainer(
        lm, work / "trainer", rehearsal=Rehearsal(packaged_prompts(), defaults.rehearsal_pairs),
        anchoring=Anchoring(weight=defaults.rehearsal_weight, batch=defaults.rehearsal_batch),
    )
    directives = ScopePolicy().default_directives.model_copy(update={"seed": args.seed})
    setting = Setting.parse("platform=")

    def ask(folder: Path) -> list[dict]:
        trainer.host.load("probe", folder)
        trainer.host.activate("probe")
        try:
            return [
                {"passage": row["id"], "right": (r := closed_book_accuracy(lm, questions_of(row))).correct,
                 "of": r.total, "f1": round(r.mean_f1 or 0.0, 4)}
                for row in passages[: step + 1]
            ]
        finally:
            trainer.host.remove("probe")

    rows: list[dict] = []
    parent: Path | None = None
    replay: list[tuple[str, ...]] = []
    started_all = time.monotonic()
    for step, row in enumerate(passages):
        texts, pairs = training_data(setting, row)
        job = TrainingJob(
            f"u{step + 1}", directives, texts=texts, pairs=pairs, parent_dir=parent, rehearse=True,
            replay=tuple(replay), replay_per_epoch=defaults.replay_per_epoch,
        )
        started = time.monotonic()
        trained = trainer.train(job)
        seconds = round(time.monotonic() - started, 1)
        full = work / f"v{step + 1}"
        shutil.copytree(trained.directory, full)
        variants: list[tuple[str, float, Path]] = [("full", 1.0, full)]
        for scale in scales if parent is not None else []:
            for how in ("whole", "update"):
                folder = work / f"v{step + 1}-{how}-{scale}"
                shutil.copytree(full, folder)
                scale_update(folder, scale, parent if how == "update" else None)
                variants.append((how, scale, folder))
        for how, scale, folder in variants:
            asked = ask(folder)
            rows.append({"update": step + 1, "how": how, "scale": scale, "train_seconds": seconds, "asked": asked})
            print(json.dumps(rows[-1]), flush=True)
        replay.append(tuple(f"Question: {q}\nAnswer: {a}" for q, a in pairs))
        parent = full

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(sys.argv), "machine": platform.platform(), "torch": torch.__version__,
        "device": str(lm.device), "seconds": round(time.monotonic() - started_all, 1), "rows": rows,
    }
    (RESULTS / f"ladder-{stamp}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"ladder-{stamp}.md").write_text(table(rows, passages))
    print(table(rows, passages))
    shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict], passages: list[dict]) -> str:
    ids = [p["id"] for p in passages]
    lines = ["| after update | rung | " + " | ".join(f"{i} right (F1)" for i in ids) + " | earlier passages right |",
             "|---|---|" + "---|" * len(ids) + "---|"]
    for r in rows:
        by = {a["passage"]: a for a in r["asked"]}
        cells = [f"{by[i]['right']}/{by[i]['of']} ({by[i]['f1']:.2f})" if i in by else "" for i in ids]
        earlier = [a for a in r["asked"] if a["passage"] != ids[r["update"] - 1]]
        rung = "1.0" if r["how"] == "full" else f"{r['scale']:g}, {r['how']}"
        lines.append(f"| {r['update']} | {rung} | " + " | ".join(cells) +
                     f" | {sum(a['right'] for a in earlier)}/{sum(a['of'] for a in earlier)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
