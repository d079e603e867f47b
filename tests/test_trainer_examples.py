"""Trainer: tokenization, loss masks and packing (no model needed beyond the tiny tokenizer)."""

from __future__ import annotations

import pytest
import torch

from services.trainer.examples import (
    IGNORE,
    Example,
    bounded_lineage,
    completion_examples,
    pack_rows,
    plan_epoch,
    replay_schedule,
    text_examples,
)


def ex(n: int, start: int = 10) -> Example:
    ids = tuple(range(start, start + n))
    return Example(ids, ids)


def test_text_examples_learn_every_real_token_and_end_of_text(tiny_model) -> None:
    tok = tiny_model.tokenizer
    [example] = text_examples(tok, ["the town was founded in one thousand"], max_tokens=256)
    assert example.input_ids[-1] == tok.eos_token_id
    assert example.labels == example.input_ids
    assert tok.pad_token_id not in example.input_ids


def test_long_text_is_truncated_to_max_tokens(tiny_model) -> None:
    [example] = text_examples(tiny_model.tokenizer, ["the river " * 200], max_tokens=32)
    assert len(example) == 32 and example.truncated


def test_completion_examples_learn_only_the_completion(tiny_model) -> None:
    tok = tiny_model.tokenizer
    prompt = "what is the capital of the country?"
    [example] = completion_examples(tok, [(prompt, "blue town")], max_tokens=256)
    prompt_len = len(tok(prompt)["input_ids"])
    assert all(label == IGNORE for label in example.labels[:prompt_len])
    learned = [t for t in example.labels if t != IGNORE]
    assert tok.decode(learned[:-1]).strip() == "blue town"
    assert learned[-1] == tok.eos_token_id


def test_completion_cut_away_entirely_is_dropped(tiny_model) -> None:
    assert completion_examples(tiny_model.tokenizer, [("the river " * 50, "blue")], max_tokens=16) == []


def test_a_step_packs_examples_into_one_row_without_padding() -> None:
    examples = [ex(50), ex(12), ex(9)]
    [step] = plan_epoch(examples, batch_size=4, row_tokens=256, pass_tokens=4096, pad_id=0, seed=0)
    [rows] = step.passes
    assert rows.input_ids.shape == (1, 71)  # 50 + 12 + 9, nothing padded
    # Positions restart at every example, so attention stays inside each one.
    starts = (rows.position_ids[0] == 0).nonzero().flatten().tolist()
    assert starts == [0, 50, 62]
    # The first token of a packed example is never a target (nothing before it is its context).
    assert all(rows.labels[0, s] == IGNORE for s in starts)
    assert step.targets == 49 + 11 + 8


def test_rows_are_padded_per_step_only_and_padding_is_never_a_target() -> None:
    examples = [ex(40), ex(30), ex(25)]
    [step] = plan_epoch(examples, batch_size=3, row_tokens=40, pass_tokens=4096, pad_id=7, seed=0)
    [rows] = step.passes
    # Rows of 40, 30 and 25 tokens (none fit together in 40): padded to 40, not to max_seq_len.
    assert rows.input_ids.shape == (3, 40)
    padding = rows.input_ids == 7
    assert int(padding.sum()) == 10 + 15
    assert bool((rows.labels[padding] == IGNORE).all())
    assert step.targets == 39 + 29 + 24


def test_large_steps_split_into_passes_under_the_token_budget() -> None:
    examples = [ex(100, start=i) for i in range(8)]
    [step] = plan_epoch(examples, batch_size=8, row_tokens=100, pass_tokens=300, pad_id=0, seed=0)
    assert [p.input_ids.shape[0] for p in step.passes] == [3, 3, 2]
    assert step.targets == 8 * 99


def test_batch_size_groups_examples_into_steps_and_order_is_seeded() -> None:
    examples = [ex(5 + i, start=100 * i) for i in range(7)]
    plan = plan_epoch(examples, batch_size=3, row_tokens=64, pass_tokens=4096, pad_id=0, seed=1)
    assert len(plan) == 3
    again = plan_epoch(examples, batch_size=3, row_tokens=64, pass_tokens=4096, pad_id=0, seed=1)
    other = [plan_epoch(examples, batch_size=3, row_tokens=64, pass_tokens=4096, pad_id=0, seed=s) for s in range(2, 6)]
    ids = lambda p: [s.passes[0].input_ids.tolist() for s in p]  # noqa: E731
    assert ids(plan) == ids(again)
    assert any(ids(o) != ids(plan) for o in other)


def test_first_fit_decreasing_fills_rows() -> None:
    rows = pack_rows([ex(60), ex(30), ex(40), ex(70)], row_tokens=100)
    assert sorted(sum(len(e) for e in row) for row in rows) == [100, 100]


@pytest.mark.parametrize("n", [1, 2])
def test_rows_tensors_are_long(n: int) -> None:
    [step] = plan_epoch([ex(5)] * n, batch_size=2, row_tokens=64, pass_tokens=64, pad_id=0, seed=0)
    assert step.passes[0].input_ids.dtype == torch.long


def test_replay_shares_each_epoch_evenly_and_covers_every_item_in_turn() -> None:
    groups = [[f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)], ["c0"]]
    schedule = replay_schedule(groups, per_epoch=5, epochs=6, seed=3)
    assert [len(epoch) for epoch in schedule] == [5] * 6
    for epoch in schedule:
        counts = {g: sum(item.startswith(g) for item in epoch) for g in "abc"}
        assert counts["c"] == 1 and {counts["a"], counts["b"]} == {2}  # c has one item; a and b share the rest
    # Within a group, items come up in turn: all six of a's before any repeats.
    a_items = [item for epoch in schedule for item in epoch if item.startswith("a")]
    assert sorted(a_items[:6]) == sorted(groups[0]) and a_items[6:12] == a_items[:6]
    assert schedule == replay_schedule(groups, per_epoch=5, epochs=6, seed=3)
    assert schedule != replay_schedule(groups, per_epoch=5, epochs=6, seed=4)


def test_replay_never_takes_more_than_there_is_and_nothing_without_a_budget() -> None:
    assert [sorted(e) for e in replay_schedule([["x", "y"]], per_epoch=16, epochs=2, seed=0)] == [["x", "y"]] * 2
    assert replay_schedule([["x"]], per_epoch=0, epochs=3, seed=0) == [[], [], []]
    assert replay_schedule([], per_epoch=8, epochs=2, seed=0) == [[], []]
    # The remainder rotates: with 3 groups and 4 per epoch, each group gets the extra one in turn.
    groups = [[f"{g}{i}" for i in range(9)] for g in "abc"]
    extra = [max("abc", key=lambda g: sum(x.startswith(g) for x in epoch)) for epoch in replay_schedule(groups, 4, 3, 0)]
    assert sorted(extra) == ["a", "b", "c"]


def test_with_more_earlier_updates_than_the_budget_the_epochs_take_turns_over_all_of_them() -> None:
    groups = [[f"g{g}-{i}" for i in range(3)] for g in range(30)]
    schedule = replay_schedule(groups, per_epoch=16, epochs=10, seed=5)
    assert all(len(epoch) == 16 for epoch in schedule)
    replayed = {item.split("-")[0] for epoch in schedule for item in epoch}
    assert replayed == {f"g{g}" for g in range(30)}  # none of the 30 is left out


def qa(tag: str) -> str:
    return f"Question: what is {tag}?\nAnswer: {tag}"


def test_a_recorded_lineage_keeps_what_replay_uses_and_stays_within_its_bound() -> None:
    with_pairs = ["a passage about x", qa("x1"), qa("x2")]
    prose_only = ["some prose", "more prose"]
    # Under the bound: an update's pairs where it has any (replay uses nothing else), else all.
    assert bounded_lineage([with_pairs, prose_only], limit=100) == [[qa("x1"), qa("x2")], prose_only]
    # Over it: even shares, a small update gives what it does not need to the others, the
    # remainder goes to the newest, each share spread over its update.
    big, small, newest = [f"b{i}" for i in range(10)], ["s0"], [f"n{i}" for i in range(10)]
    kept = bounded_lineage([big, small, newest], limit=8)
    assert [len(g) for g in kept] == [3, 1, 4] and sum(map(len, kept)) == 8
    assert kept[0] == ["b0", "b3", "b6"] and kept[1] == ["s0"] and kept[2] == ["n0", "n2", "n5", "n7"]
    # Applied update after update, as manifests do, it stays within the bound.
    lineage: list[list[str]] = []
    for update in range(40):
        lineage = bounded_lineage([*lineage, [f"u{update}-{i}" for i in range(15)]], limit=64)
        assert sum(map(len, lineage)) <= 64
    assert len(lineage) == 40 and all(len(g) >= 1 for g in lineage)
    # More updates than the bound: the oldest keep none; no bound, nothing kept.
    assert [len(g) for g in bounded_lineage([["a"], ["b"], ["c"]], limit=2)] == [0, 1, 1]
    assert bounded_lineage([["a"]], limit=0) == [[]]


def test_a_recorded_lineage_stays_within_what_a_manifest_can_hold_in_characters() -> None:
    # 30 updates of 64 sequences of 1,500 characters outside ASCII made a 17 MB manifest: it no
    # longer read back, and every later update of the scope failed
    from services.trainer.handlers import MAX_LINEAGE_CHARS, recorded_lineage

    groups = [{"adapter_id": f"a{u}", "feedback_id": f"f{u}", "sequences": [f"{u}-{i} " + "漢" * 1500 for i in range(64)]}
              for u in range(30)]
    kept = recorded_lineage(groups, limit=4096)
    assert sum(len(s) for g in kept for s in g["sequences"]) <= MAX_LINEAGE_CHARS
    assert [g["adapter_id"] for g in kept] == [f"a{u}" for u in range(30)] and all(g["sequences"] for g in kept)
    small = [{"adapter_id": "a", "feedback_id": "f", "sequences": ["short"] * 10}]
    assert recorded_lineage(small, limit=4096) == small


def test_only_a_question_asked_again_supersedes_an_earlier_answer() -> None:
    from services.trainer.examples import without_superseded

    def qa(q: str, a: str) -> str:
        return f"Question: {q}\nAnswer: {a}"

    old = [qa("What is C++ used for?", "systems"), qa("Which port does the relay use?", "7740"), "prose"]
    new = [qa("What is C used for?", "kernels"), qa("which port does  the relay use", "7741")]
    assert without_superseded([old, new]) == [[old[0], old[2]], new]
    repeated = [qa("Who keeps it?", "Brask"), qa("Who keeps it?", "Brask")]
    assert without_superseded([repeated]) == [repeated]  # within one update nothing supersedes


def test_a_recorded_lineage_names_a_bounded_number_of_updates(monkeypatch) -> None:
    from services.trainer import handlers

    monkeypatch.setattr(handlers, "MAX_LINEAGE_UPDATES", 5)
    groups = [{"adapter_id": f"a{i}", "feedback_id": f"f{i}", "sequences": [f"Fact {i}."] if i in (0, 7) else []}
              for i in range(9)]
    kept = handlers.recorded_lineage(groups, limit=4096)
    # the oldest updates without sequences dropped out; one that replay still uses stays, however old
    assert [g["adapter_id"] for g in kept] == ["a0", "a5", "a6", "a7", "a8"]
    assert handlers.recorded_lineage(groups[:5], limit=4096) == groups[:5]
