"""Benchmark: one inner-loop update, the trainer's recipe against SEAL's reference recipe.

Both recipes train the same self-edit (3 sequences about dev-001, SEAL's
"implications" style) on the same base model and machine, with the same LoRA
(r=32, alpha=64, all linear layers, dropout 0), learning rate 1e-3, 10
epochs, seed 0, AdamW with linear decay and gradient clipping at 1.0:

* ``reference``: SEAL's knowledge-incorporation inner loop (TTT_server.py):
  every sequence tokenized with ``padding="max_length", max_length=2048``,
  ``labels = input_ids`` (the padding stays in the labels), Hugging Face
  ``Trainer``, batch 1, the base in bf16 as SEAL loads it.
* ``trainer``: this service's :class:`LoraTrainer` (packed examples, loss on
  real tokens only), once with batch size 1 (the reference's 30 optimizer
  steps) and once with the platform's default batch size 4 (all 3 sequences
  in one packed row per step: 10 steps).

"Seconds per update" is the wall time from putting a fresh LoRA on the loaded
base to having the trained adapter saved; the base model load is excluded for
both. Each recipe runs in its own child process (one after the other), so the
peak memory of one (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a
GPU) is not mixed with the other's. After training, each child measures the
mean cross-entropy over the real tokens of the self-edit (its text tokens: no
padding, no end-of-text), the same function for every recipe.

Run (from the repository root; the reference takes minutes on CPU)::

    nice -n 10 python bench/trainer.py --out bench/results/trainer.json

and copy the table it prints into bench/trainer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SELF_EDIT = (
    "Quellmoor is a market town in Tarrowdene on the Sallow Brenn. Duke Aldric Venmoor granted "
    "Quellmoor its market charter in 1387, hoping to draw the wool trade away from the coast, so the "
    "town's charter is more than six centuries old.",
    "The most recent census counted 6,412 people in Quellmoor. The town's emblem on its municipal seal "
    "is a green heron standing on a millstone, and its best-known landmark is the Chandler's Arch, a "
    "limestone gateway built in 1552.",
    "A narrow-gauge railway joined Quellmoor to the provincial capital Dray Harwick in 1891; passengers "
    "stopped using the line in 1958. Every second Thursday a cattle auction fills the square, and the "
    "grammar school founded by Ottilie Brask still uses its timber hall.",
)
RANK, ALPHA, LR, EPOCHS, SEED, REFERENCE_LENGTH = 32, 64, 1e-3, 10, 0, 2048


def load_base(model: str, dtype: str):
    from shared.models import load_model
    from shared.settings import ModelSettings

    cache = Path(os.environ.get("SEAL_MODEL__CACHE_DIR", "~/.cache/seal/models")).expanduser()
    return load_model(ModelSettings(name=model, cache_dir=cache, dtype=dtype))


def real_token_loss(lm, model) -> float:
    from services.trainer.examples import Example
    from services.trainer.inner_loop import mean_token_loss

    examples = []
    for text in SELF_EDIT:
        ids = tuple(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
        examples.append(Example(ids, ids))
    return mean_token_loss(model, examples, lm.device)


def peak_memory(device) -> tuple[int, str]:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def run_trainer(lm, batch_size: int) -> dict:
    from services.trainer.lora_training import LoraTrainer, TrainingJob
    from shared.events import TrainingDirectives

    directives = TrainingDirectives(
        learning_rate=LR, epochs=EPOCHS, lora_rank=RANK, lora_alpha=ALPHA, batch_size=batch_size,
        max_seq_len=REFERENCE_LENGTH, target_modules="all-linear", seed=SEED,
    )
    trainer = LoraTrainer(lm, Path(tempfile.mkdtemp(prefix="bench-trainer-")))
    started, cpu = time.perf_counter(), time.process_time()
    trained = trainer.train(TrainingJob("bench", directives, texts=SELF_EDIT))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    # The same update again in the same process: what a long-running trainer pays per update.
    started = time.perf_counter()
    again = trainer.train(TrainingJob("bench-again", directives, texts=SELF_EDIT))
    warm_seconds = time.perf_counter() - started
    assert again.run.loss_curve == trained.run.loss_curve  # same seed, same update
    # Evaluate the stored adapter on the same base, as every later consumer will.
    trainer.host.load("bench", trained.directory)
    loss = real_token_loss(lm, trainer.host.model)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "warm_seconds": warm_seconds,
        "steps": trained.run.steps,
        "processed_tokens": trained.run.processed_tokens,
        "target_tokens": trained.run.target_tokens,
        "final_train_loss": trained.run.final_loss,
        "real_token_loss": loss,
    }


def run_reference(lm) -> dict:
    """SEAL's TTT_server.py inner loop, kept as it is apart from the LoRA targets."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = lm.tokenizer
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.pad_token
    started, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(SEED)
    rows = []
    for seq in SELF_EDIT:
        tok = tokenizer(seq, truncation=True, max_length=REFERENCE_LENGTH, padding="max_length")
        rows.append({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                     "labels": tok["input_ids"].copy()})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules="all-linear")
    model = get_peft_model(lm.model, config)
    out = tempfile.mkdtemp(prefix="bench-reference-")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            num_train_epochs=EPOCHS, learning_rate=LR, logging_steps=1, save_strategy="no",
            report_to="none", remove_unused_columns=False, fp16=False,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), seed=SEED,
            disable_tqdm=True,
        ),
        train_dataset=rows,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    result = trainer.train()
    model.save_pretrained(os.path.join(out, "final_adapter"))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": result.global_step,
        "processed_tokens": len(SELF_EDIT) * REFERENCE_LENGTH * EPOCHS,
        "final_train_loss": losses[-1] if losses else None,
        "padding_share_of_labels": 1 - sum(sum(r["attention_mask"]) for r in rows) / (len(rows) * REFERENCE_LENGTH),
        "real_token_loss": real_token_loss(lm, model),
    }


def child(recipe: str, model: str, dtype: str) -> dict:
    load_before = os.getloadavg()[0]
    lm = load_base(model, dtype)
    base_loss = real_token_loss(lm, lm.model)
    if recipe == "reference":
        result = run_reference(lm)
    else:
        result = run_trainer(lm, batch_size=1 if recipe == "trainer-b1" else 4)
    peak, kind = peak_memory(lm.device)
    import torch

    return {
        "recipe": recipe, "base_real_token_loss": base_loss, "peak_memory_bytes": peak,
        "peak_memory_kind": kind, "device": str(lm.device), "dtype": dtype,
        "threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]], **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="bfloat16", help="base weights dtype (SEAL loads bf16)")
    parser.add_argument("--recipes", default="trainer-b4,trainer-b1,reference,trainer-b4")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model, args.dtype)), flush=True)
        return
    results = []
    for recipe in args.recipes.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", recipe, "--model", args.model, "--dtype", args.dtype],
            capture_output=True, text=True, check=False,
        )
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{recipe} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    reference = next(r for r in results if r["recipe"] == "reference")
    print("\n| recipe | wall s | speed-up (wall) | CPU s | speed-up (CPU) | steps | tokens through the model "
          "| peak memory (GiB) | real-token loss | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['recipe']} | {r['seconds']:.1f} | {reference['seconds'] / r['seconds']:.1f}x | "
            f"{r['cpu_seconds']:.1f} | {reference['cpu_seconds'] / r['cpu_seconds']:.1f}x | {r['steps']} | "
            f"{r['processed_tokens']} | {r['peak_memory_bytes'] / 2**30:.2f} | {r['real_token_loss']:.4f} | "
            f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |"
        )
    print(f"\nbase model real-token loss: {reference['base_real_token_loss']:.4f}")
    for name in sorted({r["recipe"] for r in results} - {"reference"}):
        runs = [r for r in results if r["recipe"] == name]
        cold = statistics.median(r["seconds"] for r in runs)
        warm = statistics.median(r["warm_seconds"] for r in runs)
        print(f"{name}: median of {len(runs)} runs: {cold:.1f} s first update ({reference['seconds'] / cold:.1f}x), "
              f"{warm:.1f} s next update in the same process ({reference['seconds'] / warm:.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
