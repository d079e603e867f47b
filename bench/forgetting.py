"""Sequential updates: how much does each new update make the scope forget? (SEAL's forgetting figure)

    python bench/forgetting.py --data ../shared/data/dev.jsonl --updates 8

Submits N passages one after another to ONE scope through the running
platform (embedded stack, four services), so each update builds on the
scope's active version. After each decision it scores the active version on
the questions of every passage submitted so far, and on the core set. The
result is a lower-triangular matrix: row i = after update i, column j =
accuracy on passage j. Retention of the first passage = its accuracy after
the last update / its accuracy right after its own update. JSON and Markdown
go to ``bench/results/``.

On a CPU the services run with the demo's lighter rehearsal
(``seal.cli.DEMO_CPU_SETTINGS``), as ``seal demo`` does; ``--service-env
KEY=VALUE`` adds to (or overrides) the services' environment, e.g.
``OMP_WAIT_POLICY=PASSIVE`` so that a trainer and an evaluator busy at once on
a few cores do not spin against each other. Both are recorded in the JSON.

``--policy key=value`` sets the scope's policy first, as ``seal scope-policy
set`` would: ``--policy max_regression_drop=1.0`` lifts the regression gate,
which shows how much the trained updates themselves forget (SEAL's figure has
no gate).

``--resume bench/results/forgetting-STAMP.json`` goes on with a stopped run (a
CPU run of 8 updates takes longer than a working session): the same command
plus ``--resume``, on the same machine, whose stack folder (``home`` in the
JSON, or ``--home``) still holds the run's streams and adapters. It measures the
updates the JSON lacks and rewrites that JSON. What the services held undone
when the run stopped is dropped; the update that was in flight is rejected (as an
operator would) and submitted again under another feedback id, so its writer
draws another sample (its training seed is the scope's, unchanged). The JSON
says which updates were resumed so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import typer  # noqa: E402
from platform_driver import (  # noqa: E402
    CORE,
    RESULTS,
    add_service_env_option,
    answers_with,
    bench_feedback_id,
    downloaded,
    drop_work_in_flight,
    machine_label,
    model_settings_of,
    running_platform,
    service_env_of,
    set_scope_policy,
    submit_passage,
)
from probes import covered_questions  # noqa: E402

from seal.client import call  # noqa: E402
from seal.demo import describe_outcome, load_items  # noqa: E402
from seal.processes import service_url, stop_on_sigterm  # noqa: E402
from seal.scope_policy import parse_settings  # noqa: E402
from seal.watch import PlatformWatcher  # noqa: E402
from services.evaluator.core_knowledge import load_question_set  # noqa: E402
from services.generator.settings import GeneratorConfig  # noqa: E402
from shared.lora import AdapterHost  # noqa: E402
from shared.models import load_model  # noqa: E402
from shared.registry_view import ScopePolicy, read_active  # noqa: E402


def registry_record(port_base: int, feedback_id: str) -> object:
    """The registry's record of one feedback, or why it could not be read (the run goes on)."""
    try:
        return call(service_url("registry", port_base), "GET", f"/v1/feedback/{feedback_id}")
    except Exception as exc:  # noqa: BLE001 - typer.Exit and transport errors alike: keep measuring
        return {"feedback_id": feedback_id, "unavailable": repr(exc)}


def seeded_policy(changes: dict[str, Any], seed: int) -> dict[str, Any]:
    """The policy changes of a run with ``seed``: from seed 1 on, the training seed too (the policy's
    ``default_directives.seed``). The writer's samples alone were no second sample: on the default
    model the grounding filter drops nearly all of them, and seeds 0 and 1 trained on the same data
    with the same seed, giving the same matrix question for question (bench/RESULTS.md). Seed 0
    leaves the training seed alone, so it repeats the recorded runs; a ``--policy`` that sets
    ``default_directives`` is left as it is."""
    if seed == 0 or "default_directives" in changes:
        return dict(changes)
    directives = ScopePolicy().default_directives.model_dump(mode="json")
    return {**changes, "default_directives": {**directives, "seed": seed}}


def overall_retention(matrix: list[list[int]]) -> tuple[int, int]:
    """Over every passage: questions right just after its own update (the diagonal), and right
    after the last update (the last row), summed."""
    if not matrix:
        return 0, 0
    return sum(row[i] for i, row in enumerate(matrix)), sum(matrix[-1])


def changed_questions(right: list[list[list[bool]]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(passage, question) pairs right just after their passage's own update and wrong after the
    last one (lost), and the other way round (gained)."""
    if not right:
        return [], []
    last = right[-1]
    lost, gained = [], []
    for j, own in enumerate(row[j] for j, row in enumerate(right)):
        for q, was in enumerate(own):
            if was and not last[j][q]:
                lost.append((j, q))
            elif not was and last[j][q]:
                gained.append((j, q))
    return lost, gained


def resumed_run(parser: argparse.ArgumentParser, args: argparse.Namespace, changes: dict[str, Any],
                service_env: dict[str, str]) -> dict[str, Any]:
    """The stopped run's JSON, checked against this command: a resumed run must be the same run."""
    try:
        previous = json.loads(args.resume.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"--resume {args.resume}: {exc}")
    differs = [f"{what}: {mine!r} here, {theirs!r} in the run"
               for what, mine, theirs in (("seed", args.seed, previous.get("seed")), ("policy", changes, previous.get("policy")),
                                          ("service environment", service_env, previous.get("service_env")),
                                          ("updates", len(load_items(args.data)[: args.updates]), previous.get("updates_planned")))
               if mine != theirs]
    if previous.get("command") and not same_run_command(previous["command"], sys.argv):
        differs.append(f"command: {' '.join(sys.argv)!r} here, {previous['command']!r} in the run")
    if differs:
        parser.error("--resume: not the same run: " + "; ".join(differs))
    previous["scope"] = previous.get("scope") or args.scope
    previous["home"] = previous.get("home") or (str(args.home) if args.home else None)
    if not previous["scope"] or not previous["home"] or not Path(previous["home"]).is_dir():
        parser.error("--resume: the run's scope and stack folder are needed (--scope, --home: its log's first line names "
                     "the scope; the folder is /tmp/seal-forgetting-*)")
    return previous


def submitted_before(port_base: int, seed: int, item: Any, update: int, resumed: list[dict[str, Any]]) -> tuple[str, object]:
    """How update ``update`` (the first of a resumed run) goes on, as (what, with), from what the
    registry says of its latest feedback id (the first, or the last resubmission ``resumed`` records):

    * ("submit", None): the stopped run had not submitted it;
    * ("measure", its record): its outcome came before the run stopped (promoted, held for approval,
      rejected by its gates), as an uninterrupted run would have measured it;
    * ("again", a feedback id): it was in flight, or was rejected by its decision timeout while the
      run was stopped. An open one is rejected first, as an operator would (what it left undone was
      dropped; a candidate evaluated before the stop would otherwise be promoted at its deadline, in
      the middle of this update). The id is new, unless the last one recorded never reached the
      registry (the run stopped between recording and submitting it)."""
    ids = [bench_feedback_id(seed, item), *(e["feedback_id"] for e in resumed if e.get("update") == update and e.get("feedback_id"))]
    record = registry_record(port_base, ids[-1])
    for _ in range(60):  # a promotion the stop cut short is finished by the registry's sweep
        if not isinstance(record, dict) or record.get("state") != "promoting":
            break
        time.sleep(5)
        record = registry_record(port_base, ids[-1])
    if not isinstance(record, dict) or "state" not in record:
        return ("submit", None) if len(ids) == 1 else ("again", ids[-1])
    if record["state"] in ("promoted", "awaiting_approval") or (record["state"] == "rejected" and not timed_out(record)):
        return "measure", record
    if record["state"] != "rejected":
        try:
            call(service_url("registry", port_base), "POST", f"/v1/feedback/{ids[-1]}/reject",
                 {"operator": "bench", "reason": "the benchmark stopped during this update; it is submitted again"})
        except typer.Exit:  # decided meanwhile (the registry's first sweep): go by what it decided
            record = registry_record(port_base, ids[-1])
            if isinstance(record, dict) and record.get("state") in ("promoted", "awaiting_approval"):
                return "measure", record
            if not isinstance(record, dict) or record.get("state") != "rejected":
                raise
    return "again", bench_feedback_id(seed, item, "resumed", len(ids))


def timed_out(record: dict[str, Any]) -> bool:
    """Rejected by its decision timeout (services/registry/decision.py says so in its reasons)."""
    return any("decision timeout" in str(reason) for reason in record.get("reasons") or ())


def same_run_command(first: str, now: list[str]) -> bool:
    """The stopped run's command and this one, without the options that say how to resume."""
    def essential(tokens: list[str]) -> list[str]:
        kept, skip = [], False
        for token in tokens:
            if skip:
                skip = False
            elif token in ("--resume", "--home", "--scope"):
                skip = True
            elif not token.startswith(("--resume=", "--home=", "--scope=")):
                kept.append(token)
        return kept

    return essential(shlex.split(first)) == essential(list(now))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--model", default="default")
    parser.add_argument("--core", type=Path, default=CORE)
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds to wait for one decision (the scope's decision_timeout_s too, unless --policy sets it)")
    parser.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                        help="scope policy setting for the run (repeatable), e.g. max_regression_drop=1.0")
    parser.add_argument("--seed", type=int, default=0,
                        help="which sample: the feedback ids (and so the writer's samples) derive from it, and from 1 on "
                             "the training seed is it too (seeded_policy); the same seed repeats a run")
    parser.add_argument("--resume", type=Path, metavar="JSON",
                        help="a stopped run's bench/results/forgetting-*.json: go on from its last measured update")
    parser.add_argument("--home", type=Path, help="with --resume: the run's stack folder, where its JSON does not say")
    parser.add_argument("--scope", help="with --resume: the run's scope, where its JSON does not say")
    add_service_env_option(parser)
    args = parser.parse_args()
    try:
        changes = seeded_policy(parse_settings(args.policy), args.seed)
    except ValueError as exc:
        parser.error(f"--policy: {exc}")
    # The registry gives up on a candidate after the policy's decision timeout: as long as the bench waits.
    changes.setdefault("decision_timeout_s", args.timeout)
    model_settings = model_settings_of(args)
    service_env = service_env_of(parser, args, model_settings)
    stop_on_sigterm()  # a killed run still stops its services and stack

    items = load_items(args.data)[: args.updates]
    previous = resumed_run(parser, args, changes, service_env) if args.resume else {}
    core = load_question_set(args.core)
    lm = load_model(model_settings)
    host = AdapterHost(lm.model)
    scope = previous.get("scope") or f"forgetting-{time.strftime('%H%M%S')}"
    matrix: list[list[int]] = []
    right: list[list[list[bool]]] = []  # right[i][j][q]: after update i, passage j's question q
    # Which of each passage's questions one of its self-generated probes asks for (the probes the
    # gate measures that passage by in later updates), at the generator's setting for this run.
    probe_count = int({**service_env, **os.environ}.get("SEAL_GENERATOR__SELF_PROBE_COUNT", GeneratorConfig().self_probe_count))
    covered = [
        covered_questions(item.passage, item.title, [(q.answer, q.aliases) for q in item.questions], probe_count)[1]
        for item in items
    ]
    core_after: list[int] = []
    stages: list[str] = []
    outcomes: list[str] = []  # per update: promoted or refused, the candidates' rewards, the gates' reasons
    seconds: list[float] = []
    # Per update, the registry's record of the feedback (every candidate's scores, gates and
    # reasons, the earlier-feedback questions it forgot among them), for what the report leaves out.
    records: list[object] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    resumed: list[dict[str, Any]] = []  # the updates submitted again after the run stopped in them
    home: Path | None = None
    if previous:
        matrix, right, core_after = previous["matrix"], previous["right"], previous["core_after"]
        stages, outcomes, seconds, records = previous["stages"], previous["outcomes"], previous["seconds"], previous["records"]
        resumed, home = list(previous.get("resumed", [])), Path(previous["home"])
        stamp = args.resume.stem.removeprefix("forgetting-")

    def write_report() -> str:
        """The matrix so far, as JSON and Markdown (rewritten after every update: a long run that
        is stopped keeps what it measured)."""
        n_q = [len(item.questions) for item in items]
        first_own = matrix[0][0] if matrix else 0
        first_last = matrix[-1][0] if matrix else 0
        retention = (first_last / first_own) if first_own else None
        lost, gained = changed_questions(right)
        own_all, last_all = overall_retention(matrix)
        lines = [
            f"Sequential updates to one scope, `{args.data}`, model `{args.model}`, {time.strftime('%Y-%m-%d')}, "
            f"{machine_label(lm)}"
            + f", policy {changes}.",
            "",
            "| after update | outcome | " + " | ".join(f"p{j + 1}" for j in range(len(items))) + " | core |",
            "|---|---|" + "---|" * len(items) + "---|",
        ]
        for i, row in enumerate(matrix):
            cells = [f"{row[j]}/{n_q[j]}" if j < len(row) else "" for j in range(len(items))]
            lines.append(f"| {i + 1} | {stages[i]} | " + " | ".join(cells) + f" | {core_after[i]}/{len(core)} |")
        lines.append("")
        lines += [f"- update {i + 1}: {outcome}" for i, outcome in enumerate(outcomes)]
        lines.append("")
        lines.append(
            f"First passage: {first_own}/{n_q[0] if n_q else 0} right after its update, {first_last} after the last; "
            + (f"retention {100 * retention:.0f}%." if retention is not None else "retention undefined (nothing learned at first).")
        )
        if right:
            seen = sum(covered[j][q] for j, q in lost)
            lines.append(
                f"Questions lost since their own passage's update (right just after it, wrong after the last): {len(lost)}, "
                f"{seen} of them asked for by one of that passage's {probe_count} self-generated probes (what the gate "
                f"measures it by); gained since: {len(gained)}."
            )
        if matrix:
            lines.append(
                f"All passages: {own_all} questions right just after their own update, {last_all} of those passages' "
                f"questions right after the last"
                + (f" ({100 * last_all / own_all:.0f}%)." if own_all else ".")
            )
        table = "\n".join(lines) + "\n"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"forgetting-{stamp}.md").write_text(table)
        (RESULTS / f"forgetting-{stamp}.json").write_text(
            json.dumps({"command": previous.get("command") or " ".join(sys.argv), "seed": args.seed, "scope": scope,
                        "home": str(home) if home else None, "resumed": resumed, "machine": machine_label(lm), "policy": changes, "service_env": service_env, "updates_planned": len(items), "matrix": matrix, "core_after": core_after, "stages": stages, "outcomes": outcomes, "seconds": seconds, "retention": retention, "overall": {"right_after_own_update": own_all, "right_after_last": last_all}, "self_probe_count": probe_count, "covered_by_probes": covered, "right": right, "lost": lost, "records": records}, indent=2)
        )
        return table

    def drop_undone(stack: object) -> None:
        if previous:
            print(f"dropped what the services held undone: {asyncio.run(drop_work_in_flight(stack)) or 'nothing'}", flush=True)

    with running_platform(args.model, service_env, "seal-forgetting-", home=home, before_services=drop_undone) as platform:
        store = platform.store
        home = platform.stack.data_dir
        if not previous:
            policy = set_scope_policy(platform, scope, changes)  # changes hold the decision timeout at least
            print(f"scope {scope} policy: {policy}", flush=True)
        else:
            print(f"scope {scope}: resuming after update {len(matrix)} of {len(items)} ({args.resume})", flush=True)

        def score_row(i: int, active: object) -> None:
            """The active version's answers on every passage so far, and on the core set."""
            with downloaded(store, active.adapter if active is not None else None) as directory:  # type: ignore[attr-defined]
                *passages, core_result = answers_with(lm, host, directory, [*(it.questions for it in items[: i + 1]), core])
            row = [result.correct for result in passages]
            core_right = core_result.correct
            right.append([[graded.correct for graded in result.items] for result in passages])
            matrix.append(row)
            core_after.append(core_right)
            print(f"after update {i + 1} ({stages[-1]}, {seconds[-1]:.0f}s): {row} core {core_right}/{len(core)}", flush=True)
            write_report()

        async def drive() -> None:
            async with PlatformWatcher(platform.stack.nats_settings()) as watcher:
                for i, item in enumerate(items):
                    if i < len(matrix):
                        continue  # measured before the run stopped
                    what, known = ("submit", None)
                    if previous and i == len(matrix):
                        what, known = await asyncio.to_thread(submitted_before, platform.port_base, args.seed, item, i + 1, resumed)
                    if what == "measure":
                        seconds.append(0.0)  # decided before the run stopped: its time is not known
                        stages.append(f"{known['state']} v{known['version']}" if known.get("version") else str(known["state"]))  # type: ignore[union-attr, index]
                        outcomes.append(f"{known['state']} before the run stopped (measured on resuming)")  # type: ignore[index]
                        resumed.append({"update": i + 1, "measured_only": True, "command": " ".join(sys.argv)})
                        progress_id = str(known["feedback_id"])  # type: ignore[index]
                    else:
                        again = known if what == "again" else None
                        if again and not any(e.get("feedback_id") == again for e in resumed):
                            # Recorded before it is sent: a run stopped again in this update finds it.
                            resumed.append({"update": i + 1, "feedback_id": again, "command": " ".join(sys.argv)})
                            write_report()
                        progress, waited = await submit_passage(watcher, scope, item, args.timeout, args.seed, again)  # type: ignore[arg-type]
                        seconds.append(waited)
                        stages.append(progress.stage())
                        outcomes.append(describe_outcome(progress) + (" (resumed: submitted again)" if again else ""))
                        progress_id = progress.feedback_id
                    active = await read_active(watcher.nc.jetstream(), scope)  # type: ignore[union-attr]
                    records.append(await asyncio.to_thread(registry_record, platform.port_base, progress_id))
                    # Off the event loop, so the NATS connections keep answering the server's pings.
                    await asyncio.to_thread(score_row, i, active)

        asyncio.run(drive())
    print(write_report())


if __name__ == "__main__":
    main()
