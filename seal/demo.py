"""The newcomer's demo: feedback in, adapter versions out, accuracy before and after.

It submits two fictional passages (``seal/data/demo.jsonl``: no model has
seen them) as knowledge feedback, one after another, to the services running
on the embedded stack, shows each one's progress live, and ends with a
table: per feedback, closed-book accuracy on its questions before and after,
what was promoted or rejected and why, and the lineage of the final version.
The platform never sees the questions: it writes its own probes.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from seal.watch import FeedbackProgress, PlatformWatcher
from shared import events as ev
from shared.connections import connect_nats
from shared.lora import AdapterHost
from shared.models import LoadedModel, other_base
from shared.registry_view import read_active
from shared.scoring import closed_book_accuracy
from shared.settings import NatsSettings, StoreSettings
from shared.store import AdapterStore

DEMO_DATA = Path(__file__).parent / "data" / "demo.jsonl"


@dataclass(frozen=True)
class DemoItem:
    id: str
    title: str
    passage: str
    questions: tuple[ev.Probe, ...]


def load_items(path: Path) -> list[DemoItem]:
    """Passages with their questions, one JSON object a line, as in ``seal/data/demo.jsonl``."""
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(
                DemoItem(
                    id=row["id"],
                    title=row.get("title") or row["id"],
                    passage=row["passage"],
                    questions=tuple(
                        ev.Probe(question=q["question"], answer=q["answer"], aliases=tuple(q.get("aliases", ())))
                        for q in row["questions"]
                    ),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not a passage with questions ({exc})") from exc
    return items


@contextmanager
def adapter_applied(lm: LoadedModel, host: AdapterHost, store: AdapterStore, ref: ev.ManifestRef | None) -> Iterator[LoadedModel]:
    """The base model, or the base model with a stored adapter applied (checked on load), which
    is taken off again afterwards, its downloaded copy removed."""
    if ref is None:
        yield lm
        return
    with tempfile.TemporaryDirectory(prefix="seal-demo-") as folder:
        manifest = store.get_adapter(ref, Path(folder) / "adapter")
        if why := other_base(manifest.base_model, manifest.base_model_sha256, lm.name, lm.weights_sha256):
            raise ValueError(f"the adapter at {ref.uri} was {why}")
        with host.applied("demo", Path(folder) / "adapter"):
            yield lm  # the adapter's layers are in the base model itself


def progress_table(items: list[DemoItem], ids: dict[str, str], progress: dict[str, FeedbackProgress], started: float) -> Table:
    table = Table(title=f"SEAL demo: live progress ({time.monotonic() - started:.0f}s)")
    table.add_column("feedback")
    table.add_column("stage")
    for item in items:
        fid = ids.get(item.id)
        stage = progress[fid].stage() if fid in progress else "waiting"
        table.add_row(Text(item.title), stage)  # a title from --data is text, not markup
    return table


async def run_demo(
    items: list[DemoItem],
    *,
    nats_settings: NatsSettings,
    store_settings: StoreSettings,
    lm: LoadedModel,
    scope: str = "demo",
    console: Console | None = None,
    timeout_per_feedback: float = 900.0,
    exited: Callable[[], str | None] = lambda: None,
    seed: int | None = None,
) -> dict[str, object]:
    """Submit each item's passage, show the platform's progress, then what it learned. ``exited``
    says when a service the demo depends on has exited (RuntimeError, not a long wait for nothing).
    ``seed``: the feedback ids come from it and the items' ids, and the generator samples a
    feedback's self-edits from its id, so a seeded demo on a fresh stack repeats; None: new ids
    (a stack that is kept has seen the seeded ones)."""
    console = console or Console()
    host = AdapterHost(lm.model)
    store = AdapterStore.from_settings(store_settings)
    nc = await connect_nats(nats_settings)
    js = nc.jetstream()
    started = time.monotonic()
    before_ref = (await read_active(js, scope))
    console.print(f"measuring closed-book accuracy before any update ({sum(len(i.questions) for i in items)} questions)...")
    with adapter_applied(lm, host, store, before_ref.adapter if before_ref else None) as base:
        before = {item.id: closed_book_accuracy(base, item.questions) for item in items}
    ids: dict[str, str] = {}
    outcomes: dict[str, str] = {}
    async with PlatformWatcher(nats_settings) as watcher:
        with Live(progress_table(items, ids, watcher.progress, started), console=console, refresh_per_second=2) as live:
            for item in items:
                event = ev.FeedbackSubmitted(
                    feedback_id=ev.new_id() if seed is None else ev.derived_id("demo", seed, item.id),
                    scope=scope,
                    content=ev.KnowledgeFeedback(title=item.title, passage=item.passage),
                    submitted_by="seal-demo",
                )
                ids[item.id] = event.feedback_id
                await watcher.submit(event)
                progress = watcher.progress[event.feedback_id]
                try:
                    await watcher.wait_until(
                        lambda: progress.decided or exited() is not None,
                        timeout_per_feedback,
                        on_event=lambda _: live.update(progress_table(items, ids, watcher.progress, started)),
                    )
                except TimeoutError:
                    outcomes[item.id] = f"no decision after {timeout_per_feedback:.0f}s"
                if (gone := exited()) is not None:
                    raise RuntimeError(gone)
                live.update(progress_table(items, ids, watcher.progress, started))
        final = await read_active(js, scope)
        with adapter_applied(lm, host, store, final.adapter if final else None) as after_lm:
            after = {item.id: closed_book_accuracy(after_lm, item.questions) for item in items}
        summary = Table(title="SEAL demo: what the platform learned")
        for column in ("feedback", "before", "after", "outcome"):
            summary.add_column(column)
        for item in items:
            progress = watcher.progress[ids[item.id]]
            outcomes.setdefault(item.id, describe_outcome(progress))
            summary.add_row(
                Text(item.title),
                f"{before[item.id].correct}/{before[item.id].total}",
                f"{after[item.id].correct}/{after[item.id].total}",
                outcomes[item.id],
            )
        lineage = lineage_table(store, final)
        console.print(Group(summary, lineage))
    await nc.close()
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return {
        "before": {k: v.correct for k, v in before.items()},
        "after": {k: v.correct for k, v in after.items()},
        "outcomes": outcomes,
        "final_version": final.version if final else None,
    }


def failed_part(reason: str) -> str:
    """A verdict's reason from its first failed gate on: what a person needs to see first."""
    at = reason.find("failed ")
    return reason[at:] if at > 0 else reason


def describe_outcome(progress: FeedbackProgress) -> str:
    promoted = progress.of(ev.AdapterPromoted)
    rejected = progress.of(ev.AdapterRejected)
    evaluated = progress.of(ev.AdapterEvaluated)
    rewards = ", ".join(f"{e.reward:+.2f}" for e in evaluated)  # type: ignore[attr-defined]
    if promoted:
        return f"promoted v{promoted[-1].version} (candidate rewards {rewards})"  # type: ignore[attr-defined]
    if rejected:
        reasons = "; ".join(dict.fromkeys(failed_part(r) for e in rejected for r in e.reasons))  # type: ignore[attr-defined]
        cut = reasons if len(reasons) <= 300 else reasons[:299] + "…"
        return f"rejected: {cut}" + (f" (rewards {rewards})" if rewards else "")
    if progress.of(ev.FeedbackRejected):
        return "feedback rejected: " + progress.of(ev.FeedbackRejected)[0].reason  # type: ignore[attr-defined]
    return progress.stage()


def lineage_table(store: AdapterStore, active: object) -> Table:
    table = Table(title="lineage of the final version")
    for column in ("adapter", "parent", "feedback", "self-edit", "trace id"):
        table.add_column(column)
    ref = getattr(active, "adapter", None)
    seen = 0
    while ref is not None and seen < 50:
        manifest = store.read_manifest(ref)
        table.add_row(
            manifest.adapter_id[:12],
            (manifest.parent_adapter_id or "base model")[:12],
            ", ".join(f[:12] for f in manifest.feedback_ids),
            (manifest.self_edit_id or "")[:12],
            manifest.trace_id or "",
        )
        ref = store.uri_for(manifest.scope, manifest.parent_adapter_id) if manifest.parent_adapter_id else None
        seen += 1
    if seen == 0:
        table.add_row("(no version yet: the scope still uses the base model)", "", "", "", "")
    return table


def main_sync(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]
