"""``seal ask``'s answerer: adapters switched per scope, evicted from memory and disk, broken ones contained."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_evaluator_support import untrained_adapter

from services.registry import answering
from services.registry.answering import ActiveModelAnswerer
from shared.models import LoadedModel
from shared.settings import ModelSettings

MODEL_CACHE = Path(os.environ.get("SEAL_TEST_MODEL_CACHE", "~/.cache/seal/models")).expanduser()


class CopyingStore:
    """Hands out a local PEFT directory as if downloaded and verified."""

    def __init__(self, sources: dict[str, Path]):
        self.sources = sources
        self.max_bytes: list[int | None] = []

    def get_adapter(self, ref: str, dest: Path, max_bytes: int | None = None) -> SimpleNamespace:
        self.max_bytes.append(max_bytes)
        shutil.copytree(self.sources[ref], dest)
        return SimpleNamespace(base_model_sha256=None, base_model="tiny")


class Heads:
    def __init__(self) -> None:
        self.heads: dict[str, SimpleNamespace] = {}

    async def head(self, scope: str) -> SimpleNamespace | None:
        return self.heads.get(scope)


@pytest.fixture(scope="module")
def adapter(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_adapter(tiny_model, tmp_path_factory.mktemp("ask") / "adapter")


async def test_the_oldest_adapter_leaves_memory_and_disk_and_a_broken_one_leaves_nothing(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    misfit = tmp_path / "misfit"
    shutil.copytree(adapter, misfit)
    config = json.loads((misfit / "adapter_config.json").read_text())
    (misfit / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] + 3}))
    monkeypatch.setattr(answering, "MAX_LOADED_ADAPTERS", 1)
    heads = Heads()
    left = tmp_path / "cache" / "by-process" / "999999999"  # a registry process that is gone left an adapter behind
    (left / "acme" / "old").mkdir(parents=True)
    (tmp_path / "cache" / "models").mkdir()  # what else shares the folder is left alone
    store = CopyingStore({"ref-a": adapter, "ref-b": adapter, "ref-bad": misfit})
    ask = ActiveModelAnswerer(ModelSettings(name="tiny", cache_dir=MODEL_CACHE, device="cpu"), store, heads, tmp_path / "cache")  # type: ignore[arg-type]
    assert not left.exists() and (tmp_path / "cache" / "models").is_dir()
    cache = tmp_path / "cache" / "by-process" / str(os.getpid())  # this process's own folder

    heads.heads["acme"] = SimpleNamespace(adapter_id="a", adapter="ref-a", version=1)
    assert (await ask.answer("acme", "Which river?", 4))["adapter_id"] == "a"
    heads.heads["globex"] = SimpleNamespace(adapter_id="b", adapter="ref-b", version=3)
    assert (await ask.answer("globex", "Which river?", 4))["adapter_id"] == "b"
    assert ask._host.names == ["b"]  # type: ignore[union-attr]
    assert not (cache / "acme" / "a").exists() and (cache / "globex" / "b").exists()
    from shared.lora import base_bytes
    from shared.models import load_model

    base = base_bytes(load_model(ModelSettings(name="tiny", cache_dir=MODEL_CACHE, device="cpu")).model)
    assert store.max_bytes == [base, base]  # no adapter larger than its (bare) base is downloaded

    heads.heads["initech"] = SimpleNamespace(adapter_id="bad", adapter="ref-bad", version=1)
    with pytest.raises(ValueError, match="does not load"):
        await ask.answer("initech", "Which river?", 4)
    assert ask._host.names == ["b"] and not (cache / "initech" / "bad").exists()  # type: ignore[union-attr]
    assert not [n for n, _ in ask._base.model.named_modules() if ".bad" in n]  # type: ignore[union-attr]
    assert (await ask.answer("globex", "Which river?", 4))["adapter_id"] == "b"  # still serving


async def test_a_burst_of_questions_beyond_the_bound_is_told_to_come_back(tmp_path: Path) -> None:
    # one model answers one question at a time: a burst queued without bound, each caller timing out
    import asyncio
    import threading

    from services.registry.operations import AskRequest, Operations, Unavailable
    from services.registry.ports import Busy

    asker = ActiveModelAnswerer(ModelSettings(name="tiny", cache_dir=MODEL_CACHE), CopyingStore({}), Heads(),
                                tmp_path / "cache", max_waiting=2)
    release, entered = threading.Event(), threading.Event()

    def slow(scope: str, head: object, question: str, max_new_tokens: int) -> dict:
        entered.set()
        release.wait(10)
        return {"answer": question}

    asker._answer = slow  # type: ignore[method-assign]
    first = asyncio.create_task(asker.answer("acme", "one", None))
    second = asyncio.create_task(asker.answer("acme", "two", None))
    await asyncio.to_thread(entered.wait, 10)
    with pytest.raises(Busy, match="2 questions are being answered or waiting"):
        await asker.answer("acme", "three", None)
    with pytest.raises(Unavailable, match="ask again shortly"):  # a 503 over HTTP and RPC
        await Operations(lambda: None, None, lambda: asker).ask("acme", AskRequest(question="four"))  # type: ignore[arg-type]
    release.set()
    assert [(await t)["answer"] for t in (first, second)] == ["one", "two"]
    assert (await asker.answer("acme", "five", None))["answer"] == "five"
