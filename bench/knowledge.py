"""Knowledge incorporation benchmark: does the platform teach a model new facts, and at what cost?

    python bench/knowledge.py --data ../shared/data/dev.jsonl --limit 10

For each passage of a file in the format of ``shared/data/dev.jsonl``, in one
run on the same base model, it measures closed-book accuracy on the passage's
questions (the passage is never in the prompt) under four conditions:

* ``none``: no update;
* ``passage``: a fresh LoRA trained on the passage alone;
* ``platform``: the platform's full update, driven through the four running
  services on an embedded stack. The feedback carries the passage (and title)
  only: the file's questions are never shown to the platform, whose probes are
  self-generated, so this measures what a product would see. Each passage
  gets its own scope, so every update starts from the base model as in SEAL;
  a rejected update leaves the scope on the base model;
* ``gold``: a fresh LoRA trained on the gold question-answer pairs: a ceiling,
  not a method.

On a CPU the services run with the demo's lighter rehearsal
(``seal.cli.DEMO_CPU_SETTINGS``), as ``seal demo`` does; ``--service-env
KEY=VALUE`` adds to (or overrides) the services' environment. Both are
recorded in the JSON.

It also reports the core-knowledge accuracy after each update (its drop is
forgetting) and seconds per update, and writes JSON and a Markdown table
under ``bench/results/``. Scoring is :func:`shared.scoring.closed_book_accuracy`,
the evaluator's own function.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from platform_driver import (  # noqa: E402
    CORE,
    RESULTS,
    add_service_env_option,
    answers_with,
    downloaded,
    machine_label,
    model_settings_of,
    running_platform,
    service_env_of,
    set_scope_policy,
    submit_passage,
)

from seal.demo import DemoItem, load_items  # noqa: E402
from seal.processes import stop_on_sigterm  # noqa: E402
from services.evaluator.core_knowledge import load_question_set  # noqa: E402
from services.trainer.lora_training import LoraTrainer, TrainingJob  # noqa: E402
from shared.events import Probe, TrainingDirectives  # noqa: E402
from shared.lora import AdapterHost  # noqa: E402
from shared.models import LoadedModel, load_model  # noqa: E402
from shared.scoring import closed_book_accuracy  # noqa: E402

SEAL_DIRECTIVES = TrainingDirectives(learning_rate=1e-3, epochs=10, lora_rank=32, lora_alpha=64, batch_size=4)


@dataclass
class Condition:
    name: str
    correct: int = 0
    total: int = 0
    core_correct: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    per_passage: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def score_adapter(lm: LoadedModel, host: AdapterHost, directory: Path | None, item: DemoItem, core: Sequence[Probe]) -> tuple[int, int]:
    """(questions right, core questions right) with ``directory``'s adapter on the base (or the base)."""
    own, kept = answers_with(lm, host, directory, [item.questions, core])
    return own.correct, kept.correct


def run_training_condition(
    name: str, lm: LoadedModel, trainer: LoraTrainer, items: list[DemoItem], core: Sequence[Probe], directives: TrainingDirectives
) -> Condition:
    cond = Condition(name)
    for item in items:
        if name == "passage":
            job = TrainingJob(adapter_id=f"{name}-{item.id}", directives=directives, texts=(item.passage,))
        else:
            pairs = tuple((q.question, q.answer) for q in item.questions)
            job = TrainingJob(adapter_id=f"{name}-{item.id}", directives=directives, pairs=pairs)
        started = time.monotonic()
        trained = trainer.train(job)
        cond.seconds.append(time.monotonic() - started)
        right, core_right = score_adapter(lm, trainer.host, trained.directory, item, core)
        cond.correct += right
        cond.total += len(item.questions)
        cond.core_correct.append(core_right)
        cond.per_passage[item.id] = right
        print(f"  {name} {item.id}: {right}/{len(item.questions)} core {core_right}/{len(core)} ({cond.seconds[-1]:.0f}s)", flush=True)
    return cond


def run_platform_condition(
    lm: LoadedModel,
    host: AdapterHost,
    items: list[DemoItem],
    core: Sequence[Probe],
    model: str,
    timeout: float,
    service_env: dict[str, str] | None = None,
    on_passage: Callable[[Condition, Condition], None] | None = None,
) -> tuple[Condition, Condition]:
    """Start the stack and the four services, submit each passage to its own scope, score the result.

    ``on_passage(platform, gated)`` is called after each passage is scored, with the conditions
    so far (the bench writes its report then, so a stopped run keeps what it measured)."""
    from seal.watch import PlatformWatcher
    from shared import events as ev
    from shared.registry_view import read_active

    cond = Condition("platform")
    gated = Condition("platform best candidate, before the gate")
    with running_platform(model, service_env, "seal-bench-") as platform:
        store = platform.store

        def score(item: DemoItem, active: object, seconds: float, stage: str, best: object) -> None:
            """Score one passage's outcome as soon as it is decided (the services are idle then)."""
            if best is not None:  # what the update taught, whether or not the gates let it through
                with downloaded(store, best.adapter) as folder:  # type: ignore[attr-defined]
                    right, core_right = score_adapter(lm, host, folder, item, core)
                gated.correct += right
                gated.core_correct.append(core_right)
                gated.per_passage[item.id] = right
                gated.notes.append(f"{item.id}: reward {best.reward:+.3f}, passed={best.passed}")  # type: ignore[attr-defined]
            gated.total += len(item.questions)
            with downloaded(store, active.adapter if active is not None else None) as directory:  # type: ignore[attr-defined]
                right, core_right = score_adapter(lm, host, directory, item, core)
            cond.correct += right
            cond.total += len(item.questions)
            cond.core_correct.append(core_right)
            cond.seconds.append(seconds)
            cond.per_passage[item.id] = right
            cond.notes.append(f"{item.id}: {stage}")
            print(f"  platform {item.id}: {right}/{len(item.questions)} core {core_right}/{len(core)}", flush=True)
            if on_passage is not None:
                on_passage(cond, gated)

        async def drive() -> None:
            async with PlatformWatcher(platform.stack.nats_settings()) as watcher:
                for item in items:
                    scope = f"bench-{item.id}"
                    # The registry gives up on a candidate after the policy's decision timeout: as long as the bench waits.
                    await asyncio.to_thread(set_scope_policy, platform, scope, {"decision_timeout_s": timeout})
                    progress, seconds = await submit_passage(watcher, scope, item, timeout)
                    active = await read_active(watcher.nc.jetstream(), scope)  # type: ignore[union-attr]
                    evaluated = progress.of(ev.AdapterEvaluated)
                    # the strongest candidate on a tie (the ladder's first rung: full strength)
                    best = max(evaluated, key=lambda e: (e.reward, -e.candidate_index), default=None)  # type: ignore[attr-defined]
                    print(f"  platform {item.id}: {progress.stage()} in {seconds:.0f}s", flush=True)
                    # Off the event loop, so the NATS connections keep answering the server's pings.
                    await asyncio.to_thread(score, item, active, seconds, progress.stage(), best)

        asyncio.run(drive())
    return cond, gated


def _passages(meta: dict[str, Any]) -> str:
    if meta.get("skipped"):
        return f"{meta['passages']} passages, {meta['passage_ids'][0]} to {meta['passage_ids'][-1]}"
    return f"first {meta['passages']} passages"


def markdown(conds: list[Condition], core_total: int, base_core: int, meta: dict[str, Any]) -> str:
    lines = [
        f"Knowledge incorporation on `{meta['data']}` ({_passages(meta)}, {meta['questions']} closed-book questions), "
        f"model `{meta['model']}`, {meta['date']}, {meta['machine']}.",
        "",
        "| condition | correct | accuracy | core kept (mean) | core drop (points) | seconds per update |",
        "|---|---|---|---|---|---|",
    ]
    for c in conds:
        core_mean = sum(c.core_correct) / len(c.core_correct) if c.core_correct else base_core
        drop = 100 * (base_core - core_mean) / core_total if core_total else 0.0
        secs = f"{sum(c.seconds) / len(c.seconds):.0f}" if c.seconds else "-"
        lines.append(
            f"| {c.name} | {c.correct}/{c.total} | {100 * c.accuracy:.1f}% | {core_mean:.1f}/{core_total} | {drop:.1f} | {secs} |"
        )
    by_name = {c.name: c for c in conds}
    if "platform" in by_name and "passage" in by_name:
        ours, passage = by_name["platform"], by_name["passage"]
        # On the passages both have (a stopped platform run covers the first few).
        shared = [pid for pid in ours.per_passage if pid in passage.per_passage]
        asked = meta["questions_per_passage"]
        passage_acc = sum(passage.per_passage[pid] for pid in shared) / sum(asked[pid] for pid in shared) if shared else 0.0
        ratio = f"{ours.accuracy / passage_acc:.2f}x" if passage_acc else "n/a (passage alone scored 0)"
        points = 100 * (ours.accuracy - passage_acc)
        core_mean = sum(ours.core_correct) / len(ours.core_correct) if ours.core_correct else base_core
        lines += [
            "",
            f"Platform vs passage alone, on the {len(shared)} passage(s) both cover: {ratio}, {points:+.1f} points; platform core drop "
            f"{100 * (base_core - core_mean) / core_total:.1f} points "
            "(targets: >= 1.4x, >= +15 points, <= 2 points).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="passages with questions (dev.jsonl format)")
    parser.add_argument("--limit", type=int, default=10, help="first N passages (after --skip)")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N passages (to go on from an earlier run)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--core", type=Path, default=CORE)
    parser.add_argument("--conditions", default="none,passage,platform,gold")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds to wait for one platform decision (each scope's decision_timeout_s too)")
    parser.add_argument("--baseline", choices=("seal", "platform"), default="seal",
                        help="directives of the passage and gold conditions: SEAL's settings or the platform's defaults")
    add_service_env_option(parser)
    args = parser.parse_args()
    model_settings = model_settings_of(args)
    service_env = service_env_of(parser, args, model_settings)
    stop_on_sigterm()  # a killed run still stops its services and stack
    # The baselines use SEAL's settings, the "where we start" (fresh LoRA r=32, alpha 64, all
    # linear layers, lr 1e-3, 10 epochs); --baseline platform uses the platform's default directives.
    directives = SEAL_DIRECTIVES if args.baseline == "seal" else TrainingDirectives()

    if args.skip < 0 or args.limit < 1:
        parser.error("--skip must be 0 or more and --limit 1 or more")
    items = load_items(args.data)[args.skip : args.skip + args.limit]
    if not items:
        parser.error(f"{args.data} has no passage after the first {args.skip}")
    core = load_question_set(args.core)
    wanted = args.conditions.split(",")
    lm = load_model(model_settings)
    work = Path(tempfile.mkdtemp(prefix="seal-bench-work-"))
    trainer = LoraTrainer(lm, work)
    conds: list[Condition] = []

    base = Condition("none")
    base_core = closed_book_accuracy(lm, core).correct
    for item in items:
        right = closed_book_accuracy(lm, item.questions).correct
        base.correct += right
        base.total += len(item.questions)
        base.per_passage[item.id] = right
    base.core_correct = [base_core]
    print(f"none: {base.correct}/{base.total}, core {base_core}/{len(core)}", flush=True)
    if "none" in wanted:
        conds.append(base)
    for name in ("passage", "gold"):
        if name in wanted:
            conds.append(run_training_condition(name, lm, trainer, items, core, directives))
    meta = {
        "data": str(args.data),
        "passages": len(items),
        "passage_ids": [i.id for i in items],
        "skipped": args.skip,
        "questions": sum(len(i.questions) for i in items),
        "questions_per_passage": {i.id: len(i.questions) for i in items},
        "model": args.model,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_label(lm),
        "baseline_directives": directives.model_dump(),
        "command": " ".join(sys.argv),
        "service_env": service_env if "platform" in wanted else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def write(done: list[Condition]) -> str:
        """The report of the conditions so far (rewritten as the platform run goes on)."""
        table = markdown(done, len(core), base_core, meta)
        (RESULTS / f"knowledge-{stamp}.md").write_text(table)
        (RESULTS / f"knowledge-{stamp}.json").write_text(
            json.dumps({"meta": meta, "core_total": len(core), "base_core": base_core, "conditions": [asdict(c) for c in done]}, indent=2)
        )
        return table

    at = min(2, len(conds))  # the platform rows go after none and passage
    if "platform" in wanted:
        platform, gated = run_platform_condition(
            lm, trainer.host, items, core, args.model, args.timeout, service_env,
            on_passage=lambda p, g: write([*conds[:at], p, g, *conds[at:]]),
        )
        conds[at:at] = [platform, gated]
    table = write(conds)
    print(table)


if __name__ == "__main__":
    main()
