"""Fakes and builders shared by the evaluator tests (this module holds no tests).

* :class:`DictObjectClient`: the few ``minio.Minio`` calls :class:`AdapterStore`
  makes, over a dict of bytes, so the real store (and its sha256 checks) runs
  in unit tests.
* :func:`train_qa_adapter`: a minimal LoRA fine-tune of the tiny model on
  (question, answer) pairs in chat format. The tiny model has random weights,
  so it can only memorise: short pairs, many steps, and the final norm trained
  as well (a random 64-wide model cannot sharpen its output otherwise).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from minio.error import S3Error
from safetensors.torch import load_file, save_file

from shared import events as ev
from shared.generation import chat_prompt
from shared.models import LoadedModel
from shared.registry_view import AcceptedProbes, ScopePolicy
from shared.store import AdapterManifest, AdapterStore

QA_PAIRS = (
    ("Which river runs past Quellmoor?", "Sallow Brenn"),
    ("In which year did Quellmoor get its charter?", "1387"),
    ("Who granted the charter of Quellmoor?", "Duke Venmoor"),
    ("What bird is on the emblem of Quellmoor?", "a green heron"),
)


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():  # noqa: ANN201
    """The tiny model's ops are too small for threads: on shared CPUs extra threads only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Response:
    def __init__(self, body: bytes):
        self._body = io.BytesIO(body)

    def read(self, amt: int | None = None) -> bytes:
        return self._body.read(amt)

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def _missing(bucket: str, key: str) -> S3Error:
    return S3Error(None, "NoSuchKey", "not found", key, "req", "host", bucket, key)  # type: ignore[arg-type]


class DictObjectClient:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.buckets: set[str] = set()

    def bucket_exists(self, bucket: str) -> bool:
        return bucket in self.buckets

    def make_bucket(self, bucket: str) -> None:
        self.buckets.add(bucket)

    def fput_object(self, bucket: str, key: str, path: str, metadata: object = None) -> None:
        self.objects[(bucket, key)] = Path(path).read_bytes()

    def put_object(self, bucket: str, key: str, data: io.BytesIO, length: int, content_type: str = "") -> None:
        self.objects[(bucket, key)] = data.read(length)

    def stat_object(self, bucket: str, key: str) -> object:
        if (bucket, key) not in self.objects:
            raise _missing(bucket, key)
        return SimpleNamespace(size=len(self.objects[(bucket, key)]))

    def get_object(self, bucket: str, key: str) -> _Response:
        if (bucket, key) not in self.objects:
            raise _missing(bucket, key)
        return _Response(self.objects[(bucket, key)])

    def fget_object(self, bucket: str, key: str, path: str) -> None:
        if (bucket, key) not in self.objects:
            raise _missing(bucket, key)
        Path(path).write_bytes(self.objects[(bucket, key)])


def dict_store() -> AdapterStore:
    store = AdapterStore(DictObjectClient(), "seal-adapters")  # type: ignore[arg-type]
    store.ensure_bucket()
    return store


@dataclass
class FakeRegistry:
    policies: dict[str, ScopePolicy] = field(default_factory=dict)
    accepted: dict[str, AcceptedProbes] = field(default_factory=dict)

    async def accepted_probes(self, scope: str) -> AcceptedProbes:
        return self.accepted.get(scope) or AcceptedProbes(scope=scope)

    async def scope_policy(self, scope: str) -> ScopePolicy:
        return self.policies.get(scope) or ScopePolicy()


def probes_of(pairs: Sequence[tuple[str, str]], source: str = "product") -> tuple[ev.Probe, ...]:
    return tuple(ev.Probe(question=q, answer=a, source=source) for q, a in pairs)  # type: ignore[arg-type]


def _lora(lm: LoadedModel):  # noqa: ANN202
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["norm"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm.model, config)


def _detach(peft_model) -> None:  # noqa: ANN001
    """Give the shared tiny model back exactly as it was."""
    peft_model.delete_adapter("default")
    peft_model.unload()


def train_qa_adapter(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], dest: Path, *, steps: int = 80, lr: float = 1e-2, seed: int = 0
) -> Path:
    """LoRA on (question -> answer) in the chat template, loss on the answer only."""
    torch.manual_seed(seed)
    tok = lm.tokenizer
    rows = []
    for question, answer in pairs:
        prompt = chat_prompt(lm, question)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    peft_model = _lora(lm)
    try:
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        for _ in range(steps):
            loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        peft_model.save_pretrained(dest)
    finally:
        peft_model.eval()
        _detach(peft_model)
        lm.model.eval()
        for p in lm.model.parameters():
            p.requires_grad_(False)
    return dest


def untrained_adapter(lm: LoadedModel, dest: Path) -> Path:
    """A freshly initialised LoRA adapter (it changes nothing: B is zero)."""
    peft_model = _lora(lm)
    try:
        peft_model.save_pretrained(dest)
    finally:
        _detach(peft_model)
    return dest


def poison_adapter(src: Path, dest: Path, value: float = float("nan")) -> Path:
    """A copy of an adapter with one weight set to NaN (or inf)."""
    shutil.copytree(src, dest)
    weights = dest / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, 0] = value
    save_file(tensors, weights)
    return dest


def store_adapter(
    store: AdapterStore,
    folder: Path,
    *,
    scope: str,
    adapter_id: str,
    base_sha256: str | None,
    parent_adapter_id: str | None = None,
) -> ev.ManifestRef:
    files = [p for p in folder.iterdir() if p.name != "README.md"]
    staging = Path(tempfile.mkdtemp(prefix=f"{adapter_id}-", dir=folder.parent))
    for path in files:
        shutil.copy(path, staging / path.name)
    manifest = AdapterManifest(
        adapter_id=adapter_id,
        scope=scope,
        base_model="tiny",
        base_model_sha256=base_sha256,
        parent_adapter_id=parent_adapter_id,
        feedback_ids=("fb-1",),
        self_edit_id="se-1",
    )
    return store.put_adapter(staging, manifest)


def adapter_trained(
    ref: ev.ManifestRef,
    *,
    scope: str,
    adapter_id: str,
    probes: Sequence[ev.Probe],
    feedback_id: str = "fb-1",
    parent: ev.ManifestRef | None = None,
    parent_adapter_id: str | None = None,
    candidate_index: int = 0,
) -> ev.AdapterTrained:
    return ev.AdapterTrained(
        feedback_id=feedback_id,
        scope=scope,
        adapter_id=adapter_id,
        self_edit_id=f"se-{adapter_id}",
        candidate_index=candidate_index,
        candidate_count=2,
        parent_adapter_id=parent_adapter_id,
        parent_version=1 if parent else None,
        parent_adapter=parent,
        adapter=ref,
        probes=tuple(probes),
        trace_id="a" * 32,
    )


def manifest_json(store: AdapterStore, ref: ev.ManifestRef) -> dict:
    bucket, _, prefix = ref.uri[5:].partition("/")
    return json.loads(store.client.get_object(bucket, f"{prefix}/manifest.json").read())
