"""LoRA adapters on one base model: add, load, switch, save, remove.

The base model is loaded once per process (:func:`shared.models.load_model`);
:class:`AdapterHost` puts LoRA adapters on it by name and switches between
them without ever reloading the base weights. The trainer trains one adapter
at a time on it; the evaluator and the generator can load stored adapters the
same way and compare them with the base::

    host = AdapterHost(lm.model)
    host.load("v3", "/tmp/adapters/v3")      # a PEFT directory
    host.activate("v3")
    logits = host.model(input_ids).logits   # base + v3
    with host.base_only():
        base_logits = host.model(input_ids).logits
    host.remove("v3")                        # the base is as it was loaded

Mind that PEFT injects the LoRA layers *into* the base model's modules: while
any adapter is loaded, calling ``lm.model`` directly also applies the active
adapter. Removing the last adapter unloads every LoRA layer again.

:meth:`AdapterHost.save` writes a plain PEFT directory (``adapter_config.json``
and ``adapter_model.safetensors`` at its top level) that
``PeftModel.from_pretrained``, vLLM and LoRAX load unchanged.

:func:`scale_update` scales a saved adapter's update (B @ A) in place: a
gentler version of the same adapter, still a plain PEFT directory.

Not thread-safe: one caller at a time (the trainer holds a lock around it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from shared.contracts import TrainingDirectives

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_LORA_RANK = int(TrainingDirectives.BOUNDS["lora_rank"][1])
# What "attention" and "mlp" mean as targets: the usual block names across architectures.
ATTENTION_HINTS = ("attn", "attention")
MLP_HINTS = ("mlp", "feed_forward", "ffn")


def attention_projections(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the attention blocks (q/k/v/o for Llama)."""
    return _linear_layers_in(model, ATTENTION_HINTS, "attention")


def mlp_projections(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the feed-forward blocks (gate/up/down for Llama)."""
    return _linear_layers_in(model, MLP_HINTS, "feed-forward")


def _linear_layers_in(model: torch.nn.Module, hints: tuple[str, ...], what: str) -> list[str]:
    names = set()
    for qualified, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = qualified.split(".")
        if parts[-1] == "base_layer":  # the original layer inside one PEFT has already wrapped
            parts = parts[:-1]
        if len(parts) >= 2 and any(hint in parts[-2].lower() for hint in hints):
            names.add(parts[-1])
    if not names:
        raise ValueError(f"found no linear layers inside {what} blocks to target")
    return sorted(names)


def lora_config(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: int,
    target_modules: str | Sequence[str] = "all-linear",
    dropout: float = 0.0,
) -> LoraConfig:
    """A causal-LM LoRA config; ``target_modules`` is "all-linear", "attention", "mlp" or names."""
    if target_modules == "attention":
        targets: str | list[str] = attention_projections(model)
    elif target_modules == "mlp":
        targets = mlp_projections(model)
    elif isinstance(target_modules, str):
        targets = target_modules
    else:
        targets = list(target_modules)
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM", bias="none"
    )


# What a plain LoRA adapter's config may set to anything (each checked or harmless to the base);
# every other key must be unset (None, false or empty), and these two only take the values here.
PLAIN_LORA_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "use_rslora", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_core", "qalora_group_size", "init_lora_weights", "bias",
    # Copies of whole modules, trained beside the LoRA layers: loaded as copies, the base's own
    # modules untouched (the evaluator deletes an untrusted adapter's copies before it unloads).
    "modules_to_save",
})
SAFE_INITS = (True, False, "gaussian")


def check_lora_config(directory: str | Path) -> dict:
    """The PEFT directory's config, refused if it is not one this platform writes.

    Read before PEFT builds anything from it: PEFT allocates the LoRA matrices a config asks for
    before it loads a single weight, so a 1 KB config with ``r: 10000000`` would take gigabytes.
    Only plain LoRA passes: every rank within the directives' bound, no option that changes the
    base model's weights (an init such as PiSSA, biases) or the model beyond a low-rank update."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{ADAPTER_CONFIG} cannot be read: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"only LoRA adapters are used here, not peft_type {kind!r}")
    if (init := config.get("init_lora_weights", True)) not in SAFE_INITS:
        # PiSSA, OLoRA, CorDA, LoftQ... rewrite the base layers' weights as the adapter loads, and
        # unloading it does not put them back: every later evaluation would use another base.
        raise ValueError(f"LoRA init_lora_weights {init!r} changes the base model's weights; "
                         f"only {', '.join(map(repr, SAFE_INITS))} are used here")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA bias {config.get('bias')!r} would load biases into the base model's layers; only 'none' is used here")
    if unknown := sorted(k for k, v in config.items() if k not in PLAIN_LORA_KEYS and v not in (None, False, {}, [], "")):
        # What this platform never sets (DoRA, layer replication, modules or tokens to save, new PEFT
        # features): each changes the model beyond a low-rank update, some its base for good.
        raise ValueError(f"LoRA options this platform never writes are set: {', '.join(unknown)}")
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [pattern])]
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
            raise ValueError(f"LoRA rank {rank!r} is outside 1..{MAX_LORA_RANK}, the most this platform trains")
    return config


def base_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's weights in float32, however it is loaded: no adapter of it needs as
    many. (Its loaded size halved the bound on a bf16 GPU, where a rank-32 adapter of a small
    model, stored in float32, is over it.)"""
    return sum(p.numel() * max(p.element_size(), 4) for p in model.parameters())


class AdapterHost:
    """Named LoRA adapters over one base model, one of them active at a time."""

    def __init__(self, base: PreTrainedModel):
        self.base = base
        self._peft: PeftModel | None = None

    @property
    def model(self) -> torch.nn.Module:
        """What to call: the base with the active adapter applied (or the bare base)."""
        return self._peft if self._peft is not None else self.base

    @property
    def names(self) -> list[str]:
        return list(self._peft.peft_config) if self._peft is not None else []

    @property
    def active(self) -> str | None:
        return self._peft.active_adapter if self._peft is not None else None

    def config(self, name: str) -> LoraConfig:
        self._require(name)
        return self._peft.peft_config[name]  # type: ignore[union-attr,return-value]

    def add_fresh(self, name: str, config: LoraConfig) -> None:
        """A new adapter with fresh LoRA weights (seed torch first for reproducible ones)."""
        self._check_free(name)
        if self._peft is None:
            self._peft = get_peft_model(self.base, config, adapter_name=name)
        else:
            self._peft.add_adapter(name, config)
        self.activate(name, trainable=True)

    def load(self, name: str, directory: str | Path, *, trainable: bool = False) -> LoraConfig:
        """Load a PEFT directory as adapter ``name`` and make it the active one.

        An adapter that does not load (its weights do not fit its config or the base, some are
        missing) raises ``ValueError`` and leaves nothing behind: the host and the base model are
        as they were, with no half-injected layer in the base."""
        self._check_free(name)
        check_lora_config(directory)
        try:
            config = PeftConfig.from_pretrained(str(directory))
            config.inference_mode = not trainable
            if self._peft is None:
                self._peft = PeftModel(self.base, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
            result = self._peft.load_adapter(str(directory), adapter_name=name, is_trainable=trainable)
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if missing:
                raise ValueError(f"the adapter's weights are missing {len(missing)} tensors, e.g. {missing[0]}")
        except Exception as exc:
            if name in self.names:
                self.remove(name)
            if isinstance(exc, (ValueError, torch.OutOfMemoryError, OSError)):
                raise  # the adapter's fault, or (out of memory, the disk) the machine's for now
            raise ValueError(f"the adapter does not load: {exc}") from exc
        self.activate(name, trainable=trainable)
        return self.config(name)

    def activate(self, name: str, *, trainable: bool = False) -> None:
        """Make ``name`` the adapter applied on every forward; only it may train."""
        self._require(name)
        self._peft.set_adapter(name, inference_mode=not trainable)  # type: ignore[union-attr]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def applied(self, name: str, directory: str | Path) -> Iterator[None]:
        """Inside this block, the PEFT directory is loaded as ``name`` and active; then removed."""
        self.load(name, directory)
        try:
            yield
        finally:
            self.remove(name)

    @contextmanager
    def base_only(self) -> Iterator[torch.nn.Module]:
        """Run the bare base model inside this block, whatever is loaded."""
        if self._peft is None:
            yield self.base
            return
        with self._peft.disable_adapter():
            yield self._peft

    def save(self, name: str, directory: str | Path) -> Path:
        """Write adapter ``name`` as a PEFT directory (files at its top level)."""
        self._require(name)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent) as staging:
            self._peft.save_pretrained(staging, selected_adapters=[name])  # type: ignore[union-attr]
            # PEFT nests every adapter but "default" in a folder named after it.
            written = Path(staging) / name if name != "default" else Path(staging)
            for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.move(str(written / file), directory / file)
        return directory

    def remove(self, name: str) -> None:
        """Drop adapter ``name``; with none left the base model is restored as loaded."""
        self._require(name)
        assert self._peft is not None
        if len(self._peft.peft_config) == 1:
            self._peft.unload()
            self._peft = None
            return
        self._peft.delete_adapter(name)

    def clear(self) -> None:
        for name in self.names:
            self.remove(name)

    def _require(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            raise KeyError(f"no adapter named {name!r} is loaded")

    def _check_free(self, name: str) -> None:
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already loaded")


def scale_update(directory: str | Path, scale: float, parent: str | Path | None = None) -> None:
    """Make the PEFT directory's adapter a gentler version of its training: ``scale`` of the way
    from where the training started to where it ended.

    A fresh adapter started from no update at all: its B matrices are multiplied by ``scale``.
    One trained on from ``parent`` (a scope's next version carries every earlier update) moves
    each of its LoRA matrices ``scale`` of the way from the parent's: ``P + scale * (T - P)``.
    Scaling the B matrices alone there weakened every earlier update with the new one (a 0.5
    rung halved what the scope had learned before). At 0 the result would be the parent, at 1
    the training; the parent's knowledge is never scaled down. A and B move together, so the
    product, the weights' change, moves along a curve: the parent's part stays whole, the new
    update's lies between ``scale**2`` and ``scale`` of itself (a fresh adapter, whose B alone is
    scaled, is exactly ``scale`` of its training).

    The config is untouched, so servers that read ``lora_alpha`` as an integer
    (vLLM, LoRAX) load the result unchanged. A ``scale`` of 1 leaves the file as it is.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if scale == 1:
        return
    path = Path(directory) / ADAPTER_WEIGHTS
    tensors, metadata = _tensors(path)
    if parent is not None:
        start, _ = _tensors(Path(parent) / ADAPTER_WEIGHTS)
        lora = [k for k in tensors if ".lora_" in k]
        unmatched = [k for k in lora if k not in start or start[k].shape != tensors[k].shape]
        if not lora or unmatched:
            raise ValueError(f"{path} was not trained on from {parent}: {len(unmatched)} of its {len(lora)} LoRA "
                             f"matrices have no match there{', e.g. ' + unmatched[0] if unmatched else ''}")
        for key in lora:
            begun = start[key].float()
            tensors[key] = (begun + scale * (tensors[key].float() - begun)).to(tensors[key].dtype)
    else:
        scaled = [key for key in tensors if ".lora_B." in key or ".lora_embedding_B" in key]
        if not scaled:
            raise ValueError(f"{path} holds no LoRA B matrix to scale")
        for key in scaled:
            tensors[key] = (tensors[key].float() * scale).to(tensors[key].dtype)
    save_file(tensors, str(path), metadata=metadata)


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}, weights.metadata()  # noqa: SIM118 (not a dict)
