"""Generator benchmark: seconds per feedback with k candidates on a real model.

    nice -n 10 python bench/generator.py --data ../shared/data/dev.jsonl --limit 2

For each of the first ``--limit`` passages of a file in the format of
``shared/data/dev.jsonl`` it sends one knowledge feedback (passage and title,
no probes, as the knowledge benchmark does) through the generator's own
handler: scope policy (k candidates, format sampled), one batched ``generate``
call with the configured sampling, parsing, validation, self-generated
probes. The bus and KV are in-memory fakes, so the time is the generator's.
Results are printed as JSON lines; ``--out`` also writes them to a file.

It reports seconds per feedback (wall clock and this process's CPU time,
which contention from other processes does not inflate; the model load is
not counted), how many
candidates were generated or rejected, how many written sequences survived
validation, and how many self-generated probes share their answer with the
file's gold questions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from services.generator.handlers import GeneratorPorts, handle_feedback  # noqa: E402
from services.generator.settings import GeneratorConfig  # noqa: E402
from services.generator.state import LedgerEntry  # noqa: E402
from services.generator.writer import SelfEditWriter  # noqa: E402
from shared import events as ev  # noqa: E402
from shared.models import load_model  # noqa: E402
from shared.registry_view import PolicyAdapterRef, ScopePolicy  # noqa: E402
from shared.settings import ModelSettings  # noqa: E402


class FixedScope:
    def __init__(self, policy: ScopePolicy):
        self.policy = policy

    async def scope_policy(self, scope: str) -> ScopePolicy:
        return self.policy

    async def policy_adapter(self, scope: str) -> PolicyAdapterRef | None:
        return None


class MemoryLedger:
    def __init__(self) -> None:
        self.entries: dict[str, LedgerEntry] = {}

    async def recall(self, feedback_id: str) -> LedgerEntry | None:
        return self.entries.get(feedback_id)

    async def record(self, feedback_id: str, entry: LedgerEntry) -> None:
        self.entries[feedback_id] = entry


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


async def run(args: argparse.Namespace) -> dict:
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][: args.limit]
    started = time.perf_counter()
    lm = load_model(ModelSettings(name=args.model, device=args.device, threads=args.threads))
    load_s = time.perf_counter() - started
    config = GeneratorConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    policy = ScopePolicy(candidates=args.k, self_edit_format=args.format)
    published: list[ev.Event] = []

    async def publish(event: ev.Event) -> None:
        published.append(event)

    ports = GeneratorPorts(FixedScope(policy), MemoryLedger(), SelfEditWriter(lm, config), publish)
    per_feedback = []
    for row in rows:
        feedback = ev.FeedbackSubmitted(
            feedback_id=f"bench-{row['id']}",
            scope="bench",
            content=ev.KnowledgeFeedback(passage=row["passage"], title=row.get("title")),
        )
        published.clear()
        t0, cpu0 = time.perf_counter(), time.process_time()
        await handle_feedback(feedback.model_dump_json().encode(), ports, config)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        generated = [e for e in published if isinstance(e, ev.SelfEditGenerated)]
        rejected = [e for e in published if isinstance(e, ev.SelfEditRejected)]
        probes = generated[0].probes if generated else ()
        gold = {norm(a) for q in row.get("questions", []) for a in (q["answer"], *q.get("aliases", []))}
        record = {
            "id": row["id"],
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "load_average_1m": round(os.getloadavg()[0], 1),
            "generated": len(generated),
            "rejected": len(rejected),
            "formats": [e.self_edit.format for e in generated],
            "written_sequences_kept": [len(e.self_edit.sequences) - 1 for e in generated],
            "rejection_reasons": [r for e in rejected for r in e.reasons],
            "self_probes": len(probes),
            "self_probes_matching_gold": sum(norm(p.answer) in gold for p in probes),
        }
        per_feedback.append(record)
        print(json.dumps(record), flush=True)
    seconds = [r["seconds"] for r in per_feedback]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(lm.device),
            "dtype": str(next(lm.model.parameters()).dtype),
        },
        "model": args.model,
        "k": args.k,
        "format": args.format,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "model_load_seconds": round(load_s, 1),
        "seconds_per_feedback_mean": round(statistics.mean(seconds), 1),
        "cpu_seconds_per_feedback_mean": round(statistics.mean(r["cpu_seconds"] for r in per_feedback), 1),
        "seconds_per_feedback": seconds,
        "feedback": per_feedback,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--format", default="sampled", choices=["sampled", "implications", "rewrite", "self_qa"])
    parser.add_argument("--max-new-tokens", type=int, default=GeneratorConfig().max_new_tokens)
    parser.add_argument("--temperature", type=float, default=GeneratorConfig().temperature)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps({k: v for k, v in result.items() if k != "feedback"}, indent=2))
    print(f"seconds per feedback (k={args.k}): {result['seconds_per_feedback_mean']} (mean of {len(result['seconds_per_feedback'])})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
