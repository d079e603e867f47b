"""The scope's current generator: the base model plus its policy adapter.

The base model is loaded once (in the service's startup hook). A scope's
policy adapter (the ReST-EM outer loop's product) is fetched from the object
store, checked against its manifest, loaded with PEFT next to the base and
swapped in per call; the least recently used adapters are unloaded beyond
``max_loaded_adapters``. A scope without one (or whose adapter is corrupt or
was trained on another base) writes with the base model alone.

All k candidates of a feedback are sampled in one batched ``generate`` call,
seeded from the feedback id, so a retry writes the same completions.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.generator.prompts import Prompt
from services.generator.settings import GeneratorConfig
from shared.generation import chat_prompt, generate
from shared.lora import check_lora_config
from shared.models import LoadedModel, other_base
from shared.registry_view import PolicyAdapterRef
from shared.scratch import fresh_own_folder
from shared.store import AdapterManifest, AdapterNotFound, IntegrityError

log = logging.getLogger(__name__)

# Downloads an adapter (with its manifest checked) into a directory: AdapterStore.get_adapter.
FetchAdapter = Callable[[PolicyAdapterRef, Path], AdapterManifest]


class UnusableAdapter(Exception):
    """A policy adapter that must not be used; the base model writes instead."""


@dataclass(frozen=True)
class Written:
    completions: list[str]
    adapter_id: str | None  # the policy adapter that wrote them; None: the base model


class SelfEditWriter:
    def __init__(
        self,
        lm: LoadedModel,
        config: GeneratorConfig,
        fetch_adapter: FetchAdapter | None = None,
        cache_dir: Path | None = None,
    ):
        self.lm = lm
        self.config = config
        self.fetch_adapter = fetch_adapter
        if cache_dir is None:
            # A folder of its own: removed with the writer, at the latest when the process exits, and
            # what a killed process left is removed as the next one starts (shared.scratch).
            mine = fresh_own_folder(Path(tempfile.gettempdir()) / "seal-generator-adapters")
            mine.mkdir(parents=True, exist_ok=True)
            cache_dir = Path(tempfile.mkdtemp(prefix="writer-", dir=mine))
            weakref.finalize(self, shutil.rmtree, cache_dir, True)
        self.cache_dir = Path(cache_dir)
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()
        # Set by stop(): writing in progress ends at its next token (shared.shutdown.Interrupted).
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Make writing that runs now, or starts later, end at its next generated token."""
        self.stopping.set()

    def write(self, prompts: Sequence[Prompt], *, seed: int, adapter: PolicyAdapterRef | None = None) -> Written:
        """Complete every prompt once, in one batched call. Blocking: run it in a thread."""
        with self._lock:
            adapter_id = self._activate(adapter)
            texts = [chat_prompt(self.lm, p.text) + p.prefill for p in prompts]
            outputs = generate(
                self.lm,
                texts,
                max_new_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                num_return_sequences=1,
                batch_size=max(1, len(texts)),
                seed=seed,
                max_prompt_tokens=self.config.max_prompt_tokens,
                stop=self.stopping,
            )
        return Written([out[0] for out in outputs], adapter_id)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

    # ------------------------------------------------------------------ adapters

    def _activate(self, ref: PolicyAdapterRef | None) -> str | None:
        if ref is not None and self.fetch_adapter is not None:
            try:
                name = self._ensure_loaded(ref)
            except (UnusableAdapter, IntegrityError, AdapterNotFound) as exc:
                log.error("policy adapter %s is unusable, writing with the base model: %s", ref.adapter_id, exc)
            else:
                self.lm.model.set_adapter(name)
                self.lm.model.enable_adapters()
                return ref.adapter_id
        if self._loaded:
            self.lm.model.disable_adapters()
        return None

    def _ensure_loaded(self, ref: PolicyAdapterRef) -> str:
        name = adapter_name(ref)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        assert self.fetch_adapter is not None
        folder = self.cache_dir / name
        manifest = self.fetch_adapter(ref, folder)
        if why := other_base(manifest.base_model, manifest.base_model_sha256, self.lm.name, self.lm.weights_sha256):
            shutil.rmtree(folder, ignore_errors=True)
            raise UnusableAdapter(why)
        try:
            check_lora_config(folder)
            self.lm.model.load_adapter(str(folder), adapter_name=name, hotswap=False)
        except Exception as exc:  # noqa: BLE001 - whatever PEFT makes of it, the base model writes instead
            if name in (getattr(self.lm.model, "peft_config", None) or {}):
                self.lm.model.delete_adapter(name)
            shutil.rmtree(folder, ignore_errors=True)
            raise UnusableAdapter(f"policy adapter {ref.adapter_id} does not load: {exc}") from exc
        self._loaded[name] = folder
        log.info("loaded policy adapter %s as %s", ref.adapter_id, name)
        self._evict()
        return name

    def _evict(self) -> None:
        while len(self._loaded) > self.config.max_loaded_adapters:
            name, folder = self._loaded.popitem(last=False)
            self.lm.model.delete_adapter(name)
            shutil.rmtree(folder, ignore_errors=True)
            log.info("unloaded policy adapter %s", name)


def adapter_name(ref: PolicyAdapterRef) -> str:
    """A PEFT adapter name (no dots) unique to this adapter's content."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"policy_{ref.adapter_id}_{ref.adapter.manifest_sha256[:12]}")
