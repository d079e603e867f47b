"""Fetching an adapter safely and putting it on the base model for one measurement.

An adapter is used only after every check passed:

1. the object store verifies the manifest digest named in the event and the
   sha256 of every file against the manifest (:meth:`AdapterStore.get_adapter`);
2. the manifest names the adapter of the event and, when it records one, the
   same base model (weights sha256) as the one this evaluator serves;
3. the PEFT files are there and every tensor in them is finite;
4. PEFT loads it onto the base model without missing or mis-shaped weights.

Any failed check raises :class:`UnusableAdapter` with a reason a person can
read. The base model is loaded once; :class:`AdapterSlot` puts at most one
adapter on it at a time and takes it off again afterwards.

Why not :class:`shared.lora.AdapterHost`: the evaluator loads adapters it
must not trust, so its slot also cleans up after a load that fails halfway
and checks that the base is exactly as loaded afterwards; and it deletes the
adapter before unloading, because PEFT's ``unload()`` keeps an active
adapter's ``modules_to_save`` copies in the base model.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from shared.events import ManifestRef
from shared.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_lora_config
from shared.models import LoadedModel, other_base
from shared.store import AdapterManifest, AdapterNotFound, IntegrityError

log = logging.getLogger(__name__)

ADAPTER_NAME = "under_evaluation"


class UnusableAdapter(Exception):
    """The adapter must not be used; ``str()`` says why, for people."""


class AdapterSource(Protocol):
    """Where adapters come from (:class:`shared.store.AdapterStore` in production)."""

    def get_adapter(self, ref: ManifestRef | str, dest: Path, max_bytes: int | None = None) -> AdapterManifest: ...


def fetch_adapter(
    source: AdapterSource,
    ref: ManifestRef,
    dest: Path,
    *,
    adapter_id: str | None,
    base_sha256: str | None,
    scope: str | None = None,
    max_bytes: int | None = None,
    base_model: str | None = None,
) -> AdapterManifest:
    """Download and verify an adapter into ``dest``; UnusableAdapter if it must not be used.

    ``scope``: the scope the event is about, which the manifest must name (an event cannot point
    at another scope's adapter); ``max_bytes``: the most its files may hold (the base's size)."""
    try:
        manifest = source.get_adapter(ref, dest, max_bytes=max_bytes)
    except IntegrityError as exc:
        raise UnusableAdapter(f"integrity check failed: {exc}") from exc
    except AdapterNotFound as exc:
        raise UnusableAdapter(f"adapter not found: {exc}") from exc
    if adapter_id is not None and manifest.adapter_id != adapter_id:
        raise UnusableAdapter(f"manifest at {ref.uri} is for adapter {manifest.adapter_id}, not {adapter_id}")
    if scope is not None and manifest.scope != scope:
        raise UnusableAdapter(f"manifest at {ref.uri} is of scope {manifest.scope!r}, not {scope!r}")
    if why := other_base(manifest.base_model, manifest.base_model_sha256, base_model or manifest.base_model, base_sha256):
        raise UnusableAdapter(f"adapter was {why}")
    check_adapter_files(dest)
    return manifest


def check_adapter_files(adapter_dir: Path) -> None:
    """The PEFT directory is complete and every weight is a finite number."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UnusableAdapter(f"{ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnusableAdapter(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UnusableAdapter(f"{ADAPTER_CONFIG} does not describe a PEFT adapter (no peft_type)")
    try:
        check_lora_config(adapter_dir)
    except ValueError as exc:
        raise UnusableAdapter(str(exc)) from exc
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UnusableAdapter(f"{ADAPTER_WEIGHTS} is missing")
    check_weights_finite(weights)


def check_weights_finite(path: Path) -> None:
    """Every tensor in a safetensors file holds only finite values."""
    bad: list[str] = []
    total = 0
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if not keys:
                raise UnusableAdapter(f"{path.name} holds no tensors")
            for key in keys:
                tensor = fh.get_tensor(key)
                if tensor.is_floating_point() or tensor.is_complex():
                    count = int((~torch.isfinite(tensor)).sum())
                    if count:
                        bad.append(f"{key} ({count} of {tensor.numel()})")
                        total += count
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UnusableAdapter(f"{path.name} is not a readable safetensors file: {exc}") from exc
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
        raise UnusableAdapter(f"non-finite weights (NaN or inf): {total} values in {shown}")


class AdapterSlot:
    """The base model, loaded once, serving either itself or one adapter at a time.

    ``with host.serving(adapter_dir) as lm:`` gives a LoadedModel that answers
    through the adapter (or the bare base for ``None``); on leaving, the
    adapter is deleted and the base model is exactly what it was. Uses are
    serialised: one model, one measurement at a time.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._lock = threading.Lock()
        self.healthy = True

    @contextmanager
    def serving(self, adapter_dir: Path | None) -> Iterator[LoadedModel]:
        with self._lock:
            if adapter_dir is None:
                yield self.lm
                return
            peft_model = self._attach(Path(adapter_dir))
            try:
                yield replace(self.lm, model=peft_model)
            finally:
                self._detach(peft_model)

    def _attach(self, adapter_dir: Path):  # noqa: ANN202 - a peft.PeftModel
        from peft import PeftConfig, PeftModel

        try:
            config = PeftConfig.from_pretrained(str(adapter_dir))
        except Exception as exc:  # noqa: BLE001 - any unreadable config is the adapter's fault
            raise UnusableAdapter(f"{ADAPTER_CONFIG} cannot be read by PEFT: {exc}") from exc
        config.inference_mode = True
        try:
            peft_model = PeftModel(self.lm.model, config, adapter_name=ADAPTER_NAME)
        except torch.OutOfMemoryError:
            self._check_clean()
            raise  # transient: the device is full now
        except Exception as exc:  # noqa: BLE001 - e.g. target modules the base does not have
            self._check_clean()
            raise UnusableAdapter(f"adapter does not fit the base model: {exc}") from exc
        try:
            result = peft_model.load_adapter(
                str(adapter_dir), adapter_name=ADAPTER_NAME, torch_device=str(self.lm.device)
            )
            missing = [k for k in result.missing_keys if ADAPTER_NAME in k]
            if missing:
                raise UnusableAdapter(f"adapter weights are missing {len(missing)} tensors, e.g. {missing[0]}")
        except UnusableAdapter:
            self._detach(peft_model)
            raise
        except (torch.OutOfMemoryError, OSError):
            self._detach(peft_model)
            raise  # the device or the disk, for now: transient, not the adapter's fault
        except Exception as exc:  # noqa: BLE001 - size mismatches and the like
            self._detach(peft_model)
            raise UnusableAdapter(f"adapter weights do not fit the base model: {exc}") from exc
        peft_model.eval()
        return peft_model

    def _detach(self, peft_model) -> None:  # noqa: ANN001
        try:
            if ADAPTER_NAME in peft_model.peft_config:
                peft_model.delete_adapter(ADAPTER_NAME)
            # With no adapter left, unloading restores every original module.
            base = peft_model.unload()
        finally:
            self._check_clean()
        if base is not self.lm.model:
            self.healthy = False
            raise RuntimeError("unloading the adapter did not give back the base model")

    def _check_clean(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        left = [
            name
            for name, module in self.lm.model.named_modules()
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        ]
        if left:
            self.healthy = False
            raise RuntimeError(f"base model still carries adapter modules after unloading: {left[:3]}")
        if hasattr(self.lm.model, "peft_config"):
            del self.lm.model.peft_config
