"""The benches' own arithmetic and options (their numbers are written down in bench/RESULTS.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import forgetting  # noqa: E402
import platform_driver  # noqa: E402
import probes  # noqa: E402


def test_overall_retention_sums_the_diagonal_and_the_last_row() -> None:
    matrix = [[3], [2, 2], [4, 0, 1], [2, 1, 1, 0]]
    assert forgetting.overall_retention(matrix) == (3 + 2 + 1 + 0, 2 + 1 + 1 + 0)
    assert forgetting.overall_retention([]) == (0, 0)


def test_changed_questions_compare_each_passage_just_after_its_update_with_the_last_row() -> None:
    right = [
        [[True, False]],
        [[True, True], [False, True]],
        [[False, True], [True, True], [True, False]],
    ]
    lost, gained = forgetting.changed_questions(right)
    assert lost == [(0, 0)]  # passage 1's first question: right after update 1, wrong after the last
    assert gained == [(0, 1), (1, 0)]  # the last passage is compared with itself: neither
    assert forgetting.changed_questions([]) == ([], [])


def test_covered_questions_match_answers_and_aliases() -> None:
    passage = (
        "Quellmoor is a market town in the upland province of Tarrowdene. It received its market charter "
        "in 1387 from Duke Aldric Venmoor, who hoped to draw the wool trade away from the coast."
    )
    written, hits = probes.covered_questions(
        passage, "Quellmoor", [("1387", ()), ("the Duke", ("Aldric Venmoor",)), ("wool", ())], limit=5
    )
    assert written >= 2 and hits == [True, True, False]


def test_dtype_reaches_the_services_and_the_benchs_own_model() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    platform_driver.add_service_env_option(parser)
    args = parser.parse_args(["--dtype", "float32", "--service-env", "X=1"])
    model = platform_driver.model_settings_of(args)
    assert model.dtype == "float32"
    env = platform_driver.service_env_of(parser, args, model)
    assert env["SEAL_MODEL__DTYPE"] == "float32" and env["X"] == "1"
    auto = parser.parse_args([])
    assert "SEAL_MODEL__DTYPE" not in platform_driver.service_env_of(parser, auto, platform_driver.model_settings_of(auto))
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])


def test_probe_coverage_counts_answers_and_aliases(shared_data) -> None:
    rows = [json.loads(line) for line in (shared_data / "dev.jsonl").read_text().splitlines() if line.strip()][:10]
    few, many = probes.coverage(rows, 5), probes.coverage(rows, 12)
    assert few["questions"] == many["questions"] == sum(len(r["questions"]) for r in rows)
    assert few["probes"] <= 5 * len(rows) < many["probes"]
    assert 0 < few["covered"] < many["covered"] <= many["questions"]
    assert 0 < few["question_first"] <= few["probes"] and few["covered_question_first"] <= few["covered"]
    nothing = probes.coverage([{"passage": "no facts here at all, none.", "questions": [{"answer": "x"}]}], 5)
    assert nothing == {"limit": 5, "probes": 0, "per_passage": 0.0, "covered": 0, "questions": 1,
                       "question_first": 0, "covered_question_first": 0}


def test_a_downloaded_adapter_is_removed_after_scoring() -> None:
    class Store:
        def get_adapter(self, ref: object, directory: Path) -> None:
            directory.mkdir(parents=True)
            (directory / "adapter_model.safetensors").write_bytes(b"weights")

    with platform_driver.downloaded(Store(), "ref") as directory:
        assert directory is not None and (directory / "adapter_model.safetensors").is_file()
    assert not directory.exists() and not directory.parent.exists()
    with platform_driver.downloaded(Store(), None) as nothing:
        assert nothing is None


def test_the_ladder_table_counts_only_the_earlier_passages_of_each_update() -> None:
    import ladder

    passages = [{"id": "p1"}, {"id": "p2"}]
    rows = [
        {"update": 1, "how": "full", "scale": 1.0, "asked": [{"passage": "p1", "right": 3, "of": 5, "f1": 0.1}]},
        {"update": 2, "how": "update", "scale": 0.5, "asked": [
            {"passage": "p1", "right": 2, "of": 5, "f1": 0.05}, {"passage": "p2", "right": 4, "of": 5, "f1": 0.2}]},
    ]
    lines = ladder.table(rows, passages).splitlines()
    assert lines[2] == "| 1 | 1.0 | 3/5 (0.10) |  | 0/0 |"
    assert lines[3] == "| 2 | 0.5, update | 2/5 (0.05) | 4/5 (0.20) | 2/5 |"  # p2 is the update's own passage


def test_a_seed_from_1_on_samples_the_training_too_and_seed_0_repeats_the_recorded_runs() -> None:
    """Seeds 0 and 1 gave the same matrix question for question: the writer's samples, all the seed
    changed, were nearly all dropped by the grounding filter, and the training seed was the same."""
    from shared.registry_view import ScopePolicy

    assert forgetting.seeded_policy({"max_regression_drop": 1.0}, 0) == {"max_regression_drop": 1.0}
    seeded = forgetting.seeded_policy({"max_regression_drop": 1.0}, 2)
    defaults = ScopePolicy().default_directives.model_dump(mode="json")
    assert seeded["default_directives"] == {**defaults, "seed": 2} and seeded["max_regression_drop"] == 1.0
    ScopePolicy.model_validate({**ScopePolicy().model_dump(mode="json"), **seeded})  # the registry takes it
    own = {"default_directives": {**defaults, "seed": 7}}
    assert forgetting.seeded_policy(own, 2) == own  # a run's own directives are left as they are


def resume_args(tmp_path: Path, run: dict, **extra: object) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "title": f"T{i}", "passage": f"Passage {i}.",
                                        "questions": [{"question": "Q?", "answer": "A"}]}) + "\n" for i in range(3)))
    stopped = tmp_path / "forgetting-20261128-062736.json"
    stopped.write_text(json.dumps(run))
    parser = argparse.ArgumentParser()
    parser.exit = lambda status=0, message=None: (_ for _ in ()).throw(SystemExit(message))  # type: ignore[method-assign]
    values = {"resume": stopped, "seed": 1, "data": data, "updates": 8, "scope": None, "home": None, **extra}
    return parser, argparse.Namespace(**values)


def test_a_resumed_run_must_be_the_same_run_and_finds_its_scope_and_folder(tmp_path: Path) -> None:
    home = tmp_path / "stack"
    home.mkdir()
    run = {"seed": 1, "policy": {"x": 1}, "service_env": {"A": "1"}, "updates_planned": 3, "matrix": [[4]]}
    parser, args = resume_args(tmp_path, run, scope="forgetting-062736", home=home)
    previous = forgetting.resumed_run(parser, args, {"x": 1}, {"A": "1"})
    assert previous["scope"] == "forgetting-062736" and previous["home"] == str(home)

    for changed, said in (({"seed": 2}, "seed: 2 here, 1 in the run"),):
        parser, args = resume_args(tmp_path, run, scope="s", home=home, **changed)
        with pytest.raises(SystemExit, match=said):
            forgetting.resumed_run(parser, args, {"x": 1}, {"A": "1"})
    parser, args = resume_args(tmp_path, run, scope="s", home=home)
    with pytest.raises(SystemExit, match="service environment"):
        forgetting.resumed_run(parser, args, {"x": 1}, {"A": "2"})
    parser, args = resume_args(tmp_path, run)  # the JSON of a run from before 2026-11-28 names neither
    with pytest.raises(SystemExit, match="scope and stack folder are needed"):
        forgetting.resumed_run(parser, args, {"x": 1}, {"A": "1"})
    parser, args = resume_args(tmp_path, {**run, "scope": "s", "home": str(tmp_path / "gone")})
    with pytest.raises(SystemExit, match="scope and stack folder are needed"):
        forgetting.resumed_run(parser, args, {"x": 1}, {"A": "1"})


@pytest.mark.servers
async def test_resuming_drops_what_the_services_held_undone_and_leaves_the_registrys(provisioned_stack) -> None:
    import nats
    from nats.js.api import ConsumerConfig

    from shared.subjects import EVENTS_STREAM

    nc = await nats.connect(provisioned_stack.nats_url)
    try:
        js = nc.jetstream()
        worker = await js.pull_subscribe("seal.events.bench.resume.work", durable="bench-resume-worker", stream=EVENTS_STREAM,
                                         config=ConsumerConfig(ack_wait=1.0))
        keeper = await js.pull_subscribe("seal.events.bench.resume.work", durable="registry-bench-resume", stream=EVENTS_STREAM)
        for i in range(3):
            await js.publish("seal.events.bench.resume.work", b"{}", headers={"Nats-Msg-Id": f"bench-resume-{i}"})
        [held] = await worker.fetch(1, timeout=5)  # in flight when the run stopped: neither acked nor nak'ed
        assert held.metadata.num_delivered == 1

        dropped = await platform_driver.drop_work_in_flight(provisioned_stack)
        assert "bench-resume-worker: 3" in dropped and not any(name.startswith("registry") for name in dropped)
        worker_info = await js.consumer_info(EVENTS_STREAM, "bench-resume-worker")
        assert worker_info.num_pending == 0 and worker_info.num_ack_pending == 0
        keeper_info = await js.consumer_info(EVENTS_STREAM, "registry-bench-resume")
        assert keeper_info.num_pending == 3
        await worker.unsubscribe()
        await keeper.unsubscribe()
        await js.delete_consumer(EVENTS_STREAM, "bench-resume-worker")
        await js.delete_consumer(EVENTS_STREAM, "registry-bench-resume")
    finally:
        await nc.close()


def test_a_resumed_update_goes_on_by_what_the_registry_says_of_its_latest_feedback(monkeypatch) -> None:
    item = type("Item", (), {"id": "dev-008"})()
    first = platform_driver.bench_feedback_id(1, item)
    states: dict[str, dict] = {}
    rejected: list[str] = []
    monkeypatch.setattr(forgetting, "registry_record", lambda port, fid: states.get(fid, {"feedback_id": fid, "unavailable": "404"}))
    monkeypatch.setattr(forgetting, "call", lambda url, method, path, body: rejected.append(path.split("/")[3]))

    def goes(resumed: list[dict]) -> tuple[str, object]:
        return forgetting.submitted_before(0, 1, item, 8, resumed)

    assert goes([]) == ("submit", None)  # never submitted
    states[first] = {"feedback_id": first, "state": "collecting", "reasons": []}
    what, again = goes([])
    assert what == "again" and again == platform_driver.bench_feedback_id(1, item, "resumed", 1) and rejected == [first]
    # Stopped again in the same update: its resubmission is the one to look at, and the next id is new.
    states[again] = {"feedback_id": again, "state": "collecting", "reasons": []}  # type: ignore[index]
    what, third = goes([{"update": 8, "feedback_id": again}])
    assert what == "again" and third not in (first, again) and rejected[-1] == again
    # Recorded but never sent: sent under that id.
    assert goes([{"update": 8, "feedback_id": "never-sent"}]) == ("again", "never-sent")
    # Rejected by its deadline while the run was stopped: submitted again, nothing to reject.
    states[first] = {"feedback_id": first, "state": "rejected",
                     "reasons": ["no candidate had an outcome within the decision timeout (3600s): ..."]}
    before = len(rejected)
    assert goes([])[0] == "again" and len(rejected) == before
    # Decided before the stop: measured, as an uninterrupted run would have.
    for state, reasons in (("promoted", []), ("awaiting_approval", []), ("rejected", ["gain 0.000 < 0.01"])):
        states[first] = {"feedback_id": first, "state": state, "reasons": reasons}
        assert goes([]) == ("measure", states[first])


def test_a_resumed_run_is_the_same_command_but_for_how_it_resumes() -> None:
    first = "bench/forgetting.py --data d.jsonl --updates 8 --seed 1"
    assert forgetting.same_run_command(first, [*first.split(), "--resume", "x.json", "--home=/tmp/h", "--scope", "s"])
    assert not forgetting.same_run_command(first, ["bench/forgetting.py", "--data", "other.jsonl", "--updates", "8", "--seed", "1"])
