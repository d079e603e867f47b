"""Benchmark: one step of the trainer's KL anchor, laid out three ways, on a real model.

    nice -n 10 python bench/anchor.py --steps 20

The anchor (``services/trainer/rehearsal.py``) holds every optimizer step of a rehearsing
update to the bare base's answers to unrelated prompts: with the trainer's defaults (all the
packaged prompts the base answers, 16 a step, weight 3) it is most of an update's training
time on a CPU. This measures its steps alone, on a LoRA moved off the base (as in the middle of
a training), for:

* ``packed, base every step``: the examples of a step packed into one row, the bare base run
  every step (as before 2026-11-27, except that both sides now project to the vocabulary only
  at answer positions, so it is a little faster than the code of then was);
* ``a row each, base every step``: one row per example, the base still run every step;
* ``a row each, base cached`` (the trainer's way): the base's side computed once per example.

Each layout takes the same steps in the same order after ``--warmup`` steps (which fill the
cache of the cached one), and must give the same divergence at every step (to 1e-5, relative,
in fp32; 1e-2 in 16-bit): the layout changes the time, not the result. Results: JSON lines on
stdout and ``--out``, written before that check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "packed, base every step": {"row_tokens": 8192, "cache_reference": False},
    "a row each, base every step": {"row_tokens": 0, "cache_reference": False},
    "a row each, base cached": {"row_tokens": 0, "cache_reference": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (10 x 16 covers the default set)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from services.trainer.lora_training import LoraTrainer, TrainingJob, lora_config
    from services.trainer.rehearsal import KlAnchor, Rehearsal
    from services.trainer.settings import REHEARSAL_BATCH, REHEARSAL_WEIGHT, TrainerConfig
    from shared.events import TrainingDirectives
    from shared.models import load_model
    from shared.settings import ModelSettings

    cache = Path(os.environ.get("SEAL_MODEL__CACHE_DIR", "~/.cache/seal/models")).expanduser()
    lm = load_model(ModelSettings(name=args.model, cache_dir=cache, dtype=args.dtype))
    rehearsal = Rehearsal.from_file(None, TrainerConfig().rehearsal_pairs)
    trainer = LoraTrainer(lm, Path(tempfile.mkdtemp(prefix="bench-anchor-")), rehearsal=rehearsal)
    directives = TrainingDirectives(seed=0)
    examples = trainer.rehearsal_examples(TrainingJob("bench", directives, texts=("x",), rehearse=True))
    trainer.host.add_fresh("moved", lora_config(lm.model, rank=directives.lora_rank, alpha=directives.lora_alpha,
                                                target_modules=directives.target_modules))
    torch.manual_seed(1)
    for name, weight in trainer.host.model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.02)
    model = trainer.host.model
    model.train()

    results, values = [], {}
    for layout, options in LAYOUTS.items():
        anchor = KlAnchor(trainer.host, examples, weight=REHEARSAL_WEIGHT, batch=REHEARSAL_BATCH, pad_id=0,
                          device=lm.device, **options)
        for step in range(args.warmup):
            anchor(model, step)
            model.zero_grad(set_to_none=True)
        seconds, kl = [], []
        for step in range(args.warmup, args.warmup + args.steps):
            started = time.perf_counter()
            kl.append(anchor(model, step))
            seconds.append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        values[layout] = kl
        results.append({
            "layout": layout, "examples": len(examples), "batch": REHEARSAL_BATCH, "steps": args.steps,
            "median_s": statistics.median(seconds), "mean_s": statistics.mean(seconds),
            "device": str(lm.device), "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        })
        print(json.dumps(results[-1]), flush=True)
    before = results[0]["median_s"]
    print("\n| layout | median s per step | of the packed layout |\n|---|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['median_s']:.2f} | {r['median_s'] / before:.0%} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    tolerance = 1e-5 if next(lm.model.parameters()).dtype == torch.float32 else 1e-2
    first = next(iter(values.values()))
    for layout, kl in values.items():
        for a, b in zip(first, kl, strict=True):
            if abs(a - b) > tolerance * abs(a):
                sys.exit(f"{layout}: divergence {b} where the first layout gave {a}")


if __name__ == "__main__":
    main()
