"""``seal ask``: answer a question with a scope's active adapter over the base model.

The base model loads on the first question (not at startup: the registry
does not need it to decide anything). Adapters are downloaded once per
adapter id, checked against their manifest (sha256 of every file), and kept
loaded side by side in one PEFT model; the scope's active one is switched in
for each answer. One question is answered at a time. Beyond
``MAX_LOADED_ADAPTERS`` the oldest is unloaded and its files deleted, so the
cache stays within a few adapters' size on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from shared.generation import chat_prompt, generate
from shared.lora import AdapterHost, base_bytes
from shared.models import LoadedModel, load_model, other_base
from shared.scratch import fresh_own_folder
from shared.settings import ModelSettings
from shared.store import AdapterStore

from .ledger import Ledger
from .ports import Busy, Refused

log = logging.getLogger(__name__)

MAX_LOADED_ADAPTERS = 8


class ActiveModelAnswerer:
    def __init__(
        self,
        model_settings: ModelSettings,
        store: AdapterStore,
        ledger: Ledger,
        cache_dir: Path,
        max_new_tokens: int = 64,
        max_waiting: int = 16,
    ):
        self.model_settings = model_settings
        self.store = store
        self.ledger = ledger
        # One folder per process, and what processes that are gone left is removed: the cache of
        # adapters is bounded in memory (MAX_LOADED_ADAPTERS), its files with it.
        # (under a folder of their own: the configured one may hold other things, the models' cache)
        self.cache_dir = fresh_own_folder(Path(cache_dir).expanduser() / "by-process")
        self.max_new_tokens = max_new_tokens
        self.max_waiting = max_waiting
        self._waiting = 0  # asks in this process, answering or waiting for the model
        self._lock = asyncio.Lock()
        # The base model is one: a cancelled ask releases the asyncio lock while its thread still
        # generates, so the thread takes this one too (another ask must not swap adapters under it).
        self._model_lock = threading.Lock()
        self._base: LoadedModel | None = None
        self._host: AdapterHost | None = None
        self._max_adapter_bytes: int | None = None
        self._loaded: list[tuple[str, Path]] = []  # (adapter id, its files), oldest first

    async def answer(self, scope: str, question: str, max_new_tokens: int | None) -> dict[str, Any]:
        if self._waiting >= self.max_waiting:
            raise Busy(f"{self._waiting} questions are being answered or waiting for the model already (at most "
                       f"{self.max_waiting}, registry.ask_max_waiting); ask again shortly")
        self._waiting += 1
        try:
            head = await self.ledger.head(scope)
            async with self._lock:
                return await asyncio.to_thread(self._answer, scope, head, question, max_new_tokens or self.max_new_tokens)
        finally:
            self._waiting -= 1

    def _answer(self, scope: str, head: Any, question: str, max_new_tokens: int) -> dict[str, Any]:
        with self._model_lock:
            return self._answer_alone(scope, head, question, max_new_tokens)

    def _answer_alone(self, scope: str, head: Any, question: str, max_new_tokens: int) -> dict[str, Any]:
        if self._base is None:
            self._base = load_model(self.model_settings)
            self._max_adapter_bytes = base_bytes(self._base.model)  # before any adapter is in it
            self._host = AdapterHost(self._base.model)
        base, host = self._base, self._host
        assert host is not None
        adapter_id = None
        if head is None:
            with host.base_only() as bare:
                text = self._generate(base, bare, question, max_new_tokens)
        else:
            self._activate(head.adapter_id, head.adapter, scope)
            text = self._generate(base, host.model, question, max_new_tokens)
            adapter_id = head.adapter_id
        return {
            "scope": scope,
            "question": question,
            "answer": text,
            "version": head.version if head else None,
            "adapter_id": adapter_id,
            "base_model": base.name,
        }

    def _generate(self, base: LoadedModel, model: Any, question: str, max_new_tokens: int) -> str:
        lm = dataclasses.replace(base, model=model)
        out = generate(lm, [chat_prompt(lm, question)], max_new_tokens=max_new_tokens, temperature=0.0)
        return out[0][0].split("\n")[0].strip() if out and out[0] else ""

    def _activate(self, adapter_id: str, ref: Any, scope: str) -> None:
        host = self._host
        assert self._base is not None and host is not None
        if adapter_id not in host.names:
            dest = self.cache_dir / scope / adapter_id
            dest.parent.mkdir(parents=True, exist_ok=True)  # get_adapter stages beside dest
            try:
                # verifies every file's sha256; an adapter larger than its base is refused before download
                manifest = self.store.get_adapter(ref, dest, max_bytes=self._max_adapter_bytes)
                base = self._base
                if why := other_base(manifest.base_model, manifest.base_model_sha256, base.name, base.weights_sha256):
                    raise Refused(f"adapter {adapter_id} was {why} (this registry's)")
                host.load(adapter_id, dest)  # a load that fails leaves nothing in the base model
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
            self._loaded.append((adapter_id, dest))
            while len(self._loaded) > MAX_LOADED_ADAPTERS:
                oldest, files = self._loaded.pop(0)
                host.remove(oldest)
                shutil.rmtree(files, ignore_errors=True)
        host.activate(adapter_id)
