"""The core-knowledge set (packaged, filtered per base, remembered) and the optional LLM judge."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from test_evaluator_support import DictObjectClient

from services.evaluator.core_knowledge import (
    LayeredKeptQuestions,
    MemoryKeptQuestions,
    ObjectStoreKeptQuestions,
    core_set_for_base,
    load_question_set,
)
from services.evaluator.judge import OpenAICompatibleJudge
from services.evaluator.settings import PACKAGED_CORE_SET, EvaluatorConfig, EvaluatorSettings, JudgeSettings
from services.evaluator.verdict import regression_gate, scores_of
from shared import events as ev
from shared.scoring import grade_answers


def test_the_packaged_core_set_is_the_default() -> None:
    settings = EvaluatorSettings(_secrets_dir="/nonexistent")
    assert settings.evaluator.core_set_path == PACKAGED_CORE_SET
    probes = load_question_set(PACKAGED_CORE_SET)
    assert len(probes) == 107
    assert all(p.question and p.answer for p in probes)
    assert settings.evaluator.judge.enabled is False  # nothing depends on an external service


def test_a_bad_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "core.jsonl"
    path.write_text('{"question": "Q?", "answer": "A"}\n\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match=r"core.jsonl:3: not a question row"):
        load_question_set(path)
    with pytest.raises(FileNotFoundError):
        load_question_set(tmp_path / "absent.jsonl")


QUESTIONS = tuple(ev.Probe(question=f"Q{i}?", answer=f"A{i}") for i in range(4))


class FakeBase:
    """Answers the even questions right; counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, probes):  # noqa: ANN001, ANN204
        self.calls += 1
        return grade_answers(probes, [p.answer if i % 2 == 0 else "?" for i, p in enumerate(probes)])


def test_another_base_keeps_only_what_it_answers_and_asks_once() -> None:
    base, kept = FakeBase(), MemoryKeptQuestions()
    first = core_set_for_base(QUESTIONS, model_name="Qwen/Qwen2.5-7B", mode="auto", cache_key="k", kept=kept, score_base=base)
    again = core_set_for_base(QUESTIONS, model_name="Qwen/Qwen2.5-7B", mode="auto", cache_key="k", kept=kept, score_base=base)
    assert [p.question for p in first] == ["Q0?", "Q2?"] and again == first
    assert base.calls == 1


def test_the_default_base_keeps_the_whole_set_unless_told_otherwise() -> None:
    base = FakeBase()
    whole = core_set_for_base(QUESTIONS, model_name="default", mode="auto", cache_key="k", kept=MemoryKeptQuestions(), score_base=base)
    assert whole == QUESTIONS and base.calls == 0
    filtered = core_set_for_base(QUESTIONS, model_name="default", mode="always", cache_key="k", kept=MemoryKeptQuestions(), score_base=base)
    assert len(filtered) == 2
    kept_all = core_set_for_base(QUESTIONS, model_name="other", mode="never", cache_key="k", kept=MemoryKeptQuestions(), score_base=base)
    assert kept_all == QUESTIONS


def test_the_filter_survives_a_restart_through_the_object_store() -> None:
    client = DictObjectClient()
    stored = ObjectStoreKeptQuestions(client, "seal-adapters")
    base = FakeBase()
    core_set_for_base(QUESTIONS, model_name="other", mode="auto", cache_key="sha-x", kept=LayeredKeptQuestions(MemoryKeptQuestions(), stored), score_base=base)
    assert json.loads(client.objects[("seal-adapters", "evaluator/core-knowledge/sha-x.json")]) == {"questions": ["Q0?", "Q2?"]}
    # A new process: empty memory, same store.
    restarted = core_set_for_base(QUESTIONS, model_name="other", mode="auto", cache_key="sha-x", kept=LayeredKeptQuestions(MemoryKeptQuestions(), stored), score_base=base)
    assert len(restarted) == 2 and base.calls == 1
    assert stored.get("absent") is None


# --------------------------------------------------------------------------- judge


def judge_with(handler, **settings) -> OpenAICompatibleJudge:  # noqa: ANN001
    config = JudgeSettings(enabled=True, base_url="http://judge.test/v1", model="grader", **settings)
    return OpenAICompatibleJudge(config, transport=httpx.MockTransport(handler))


def reply(text: object) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text}}]})


def test_judge_speaks_openai_chat_completions() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return reply("Yes.")

    judge = judge_with(handler, api_key=SecretStr("sk-test"))
    assert judge("Coldest continent?", "the South Pole one", ["Antarctica"]) is True
    request = seen[0]
    assert request.url == "http://judge.test/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    body = json.loads(request.content)
    assert body["model"] == "grader" and body["temperature"] == 0
    assert "Antarctica" in body["messages"][1]["content"]


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("no", False), ("NO, it is not", False), ("maybe", None), ("", None), (None, None),
        # content parts, as some OpenAI-compatible servers answer: used to raise AttributeError
        # outside the judge's error handling and fail the whole evaluation
        ([{"type": "text", "text": "Yes"}], True), ([{"type": "image"}, {"type": "text", "text": "no"}], False),
        ({"unexpected": "shape"}, None), (7, None),
    ],
)
def test_judge_verdicts(text: object, verdict: bool | None) -> None:
    assert judge_with(lambda request: reply(text))("Q?", "x", ["y"]) is verdict


def test_a_failing_judge_leaves_the_rules_in_charge_and_pauses() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, text="overloaded")

    judge = judge_with(handler)
    probes = [ev.Probe(question=f"Q{i}?", answer="right") for i in range(5)]
    graded = grade_answers(probes, ["right", "wrong", "wrong", "wrong", "wrong"], judge)
    assert graded.correct == 1  # the rules' verdicts stand
    assert calls == 3  # after three failures in a row it stops asking for a while


def test_filtering_at_startup_is_also_the_base_core_score(tiny_model, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """With the filter on, the startup pass over the core set doubles as the base's core score."""
    from test_evaluator_support import FakeRegistry, dict_store

    from services.evaluator import measurement
    from services.evaluator.app import build_ports
    from services.evaluator.measurement import base_model_key
    from services.evaluator.settings import EvaluatorConfig

    core = tmp_path / "core.jsonl"
    core.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(4)))
    asked: list[str] = []

    def answers(lm, questions, **kwargs):  # noqa: ANN001, ANN202 - a base that knows the even ones
        asked.extend(questions)
        return [f"A{q[1]}" if int(q[1]) % 2 == 0 else "no idea" for q in questions]

    monkeypatch.setattr(measurement, "closed_book_answers", answers)
    settings = EvaluatorSettings(
        evaluator=EvaluatorConfig(core_set_path=core, core_filter="always"), _secrets_dir=str(tmp_path / "none")
    )
    ports = build_ports(settings, lm=tiny_model, adapters=dict_store(), registry=FakeRegistry())
    assert [p.question for p in ports.core_set] == ["Q0?", "Q2?"]
    base = base_model_key(tiny_model.weights_sha256, tiny_model.name)
    results = ports.measurer.measure(base, lambda: None, {"core": ports.core_set})
    assert results["core"].accuracy == 1.0
    assert len(asked) == 4  # only the startup pass asked anything


def test_by_default_every_core_question_is_asked_so_churn_nets_out() -> None:
    """An update that turns one right answer wrong and one wrong answer right drops nothing."""
    base = FakeBase()
    config = EvaluatorConfig()
    asked = core_set_for_base(
        QUESTIONS, model_name="Qwen/Qwen2.5-7B", mode=config.core_filter, cache_key="k", kept=MemoryKeptQuestions(), score_base=base,
    )
    assert asked == QUESTIONS and base.calls == 0
    before = grade_answers(asked, ["A0", "?", "A2", "?"])
    after = grade_answers(asked, ["?", "A1", "A2", "?"])  # Q0 lost, Q1 gained
    parent = scores_of({"core": before}, product_weight=2.0)
    candidate = scores_of({"core": after}, product_weight=2.0)
    assert regression_gate(candidate, parent, max_drop=0.02).passed
    # The one-sided set (only what the base answers right) sees the loss alone.
    kept = [p for p, item in zip(asked, before.items, strict=True) if item.correct]
    one_sided_after = grade_answers(kept, ["?", "A2"])
    assert not regression_gate(
        scores_of({"core": one_sided_after}, 2.0), scores_of({"core": grade_answers(kept, ["A0", "A2"])}, 2.0), max_drop=0.02
    ).passed
