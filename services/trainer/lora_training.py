"""One LoRA update on the process's base model: data in, PEFT directory out.

:class:`LoraTrainer` owns the base model (loaded once per process) and an
:class:`shared.lora.AdapterHost` over it. Each :meth:`LoraTrainer.train` call:

1. tokenizes the job's data (self-edit texts, or (prompt, completion) pairs),
   the lineage's earlier sequences that a continuing update replays (a share
   of them in every epoch, every earlier update alike) and, when the job
   rehearses, the base model's own answers to unrelated prompts, which every
   step holds the model to (rehearsal.py);
2. puts the adapter to train on the base: the parent adapter's directory
   loaded as a trainable copy (its rank and targets win), or a fresh LoRA from
   the directives (seeded, so the same job gives the same weights);
3. runs :func:`inner_loop.fit` over packed steps;
4. saves the adapter as a PEFT directory, then removes it from the base, so
   the next job (any scope) starts from the bare base model without a reload;
5. scales the saved update by the directives' ``adapter_scale``: a fresh adapter's B matrices,
   or, trained on from a parent, each matrix that far from the parent's (the scope's earlier
   updates are never scaled down with the new one; ``shared.lora.scale_update``).

The unscaled result of the last few trainings is kept on local disk: a job
that differs from one of them only in ``adapter_scale`` (the generator's
strength ladder: the same data at gentler strengths) is not trained again,
only scaled.

Training runs one job at a time (a lock), in the caller's thread: the
service calls it through ``asyncio.to_thread``. :meth:`LoraTrainer.stop` (the
service shutting down) ends a running training before its next step with
:class:`inner_loop.TrainingInterrupted`, and the generation of the base's
rehearsal answers that may come first at its next token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import resource
import shutil
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from services.trainer import examples as ex
from services.trainer.inner_loop import NonFiniteTraining, TrainingRun, fit
from services.trainer.rehearsal import KlAnchor, Rehearsal
from services.trainer.settings import REHEARSAL_BATCH, REHEARSAL_WEIGHT
from shared.broker import work_begins
from shared.events import TrainingDirectives
from shared.generation import chat_prompt
from shared.lora import ADAPTER_WEIGHTS, AdapterHost, lora_config, scale_update
from shared.models import LoadedModel
from shared.scratch import fresh_own_folder

log = logging.getLogger(__name__)

KEEP_TRAINED = 4  # unscaled trainings kept for the strength ladder's gentler candidates


class TrainingRejected(Exception):
    """This job cannot produce a usable adapter; ``reason`` says why, for people."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrainingJob:
    adapter_id: str
    directives: TrainingDirectives
    texts: tuple[str, ...] = ()  # learned whole (self-edit sequences)
    pairs: tuple[tuple[str, str], ...] = ()  # (user prompt, completion): completion learned
    parent_dir: Path | None = None  # PEFT directory of the adapter to continue
    rehearse: bool = False  # hold the model to the base's answers to unrelated prompts (rehearsal.py)
    # Earlier sequences of the lineage, one group per earlier update, oldest first: every epoch
    # also trains on ``replay_per_epoch`` of them (an update's question-answer pairs when it has
    # any), shared evenly among the groups and taken in turn within each
    # (examples.replay_schedule), so every earlier update keeps its place.
    replay: tuple[tuple[str, ...], ...] = ()
    replay_per_epoch: int = 0


@dataclass
class TrainedAdapter:
    directory: Path
    run: TrainingRun
    lora: dict[str, Any]
    examples: int
    truncated: int
    rehearsal_examples: int
    rehearsal_kl: float | None  # mean KL to the base on the rehearsal answers over the last epoch
    device: str
    dtype: str
    peak_memory_bytes: int
    peak_memory_kind: str
    versions: dict[str, str] = field(default_factory=dict)
    replayed_per_epoch: int = 0  # earlier examples of the lineage trained on in each epoch
    adapter_scale: float = 1.0
    reused_from: str | None = None  # the adapter whose training this one scales, not trained again


@dataclass(frozen=True)
class Layout:
    """How steps are laid out in memory (not hyperparameters: results do not depend on it)."""

    row_tokens: int = 4096  # longest packed row
    pass_tokens: int = 8192  # largest forward pass, padding included
    step_pause_s: float = 0.0  # tests only: slow training down without using CPU


@dataclass(frozen=True)
class Anchoring:
    """How hard rehearsal holds the model: the KL term's weight and examples per step."""

    weight: float = REHEARSAL_WEIGHT
    batch: int = REHEARSAL_BATCH


class LoraTrainer:
    def __init__(
        self,
        lm: LoadedModel,
        work_dir: Path,
        layout: Layout = Layout(),
        rehearsal: Rehearsal | None = None,
        anchoring: Anchoring = Anchoring(),
    ):
        self.lm = lm
        self.host = AdapterHost(lm.model)
        self.work_dir = Path(work_dir)
        self.layout = layout
        self.rehearsal = rehearsal
        self.anchoring = anchoring
        self._lock = threading.Lock()
        # Set by stop(): a running training ends before its next step (TrainingInterrupted), the
        # rehearsal answers' generation at its next token (Interrupted).
        self.stopping = threading.Event()
        # training key -> (unscaled PEFT directory, what its training gave), oldest first
        self._trained: OrderedDict[str, tuple[Path, TrainedAdapter]] = OrderedDict()
        self._unscaled = fresh_own_folder(self.work_dir / "unscaled")
        # Each job's output until it is uploaded (the upload removes it), per process as well: a
        # trainer killed in between (out of memory, restarted as hung) left it in the pod's /tmp.
        self.outputs = fresh_own_folder(self.work_dir / "trained")

    def stop(self) -> None:
        """Make a training that runs now, or starts later, end before its next step."""
        self.stopping.set()

    @property
    def base_model(self) -> str:
        return self.lm.name

    @property
    def base_model_sha256(self) -> str | None:
        return self.lm.weights_sha256

    def examples_for(self, job: TrainingJob) -> list[ex.Example]:
        tokenizer, limit = self.lm.tokenizer, job.directives.max_seq_len
        found = ex.text_examples(tokenizer, job.texts, limit)
        if job.pairs:
            prompts = [(_as_prompt(self.lm, p), c) for p, c in job.pairs]
            found += ex.completion_examples(tokenizer, prompts, limit)
        return found

    def replay_examples(self, job: TrainingJob) -> list[list[ex.Example]]:
        """The lineage's earlier sequences as examples, one list per earlier update.

        An update that was trained on question-answer pairs replays those alone: they hold its
        facts in the form they are asked, in a few dozen tokens each, where the passage and
        other prose would spend the budget's tokens on the same facts again. An update with no
        pairs replays its texts.
        """
        if job.replay_per_epoch <= 0:
            return []
        groups = []
        for sequences in job.replay:
            texts, pairs = ex.split_question_answers(sequences)
            groups.append(self.examples_for(replace(job, texts=() if pairs else texts, pairs=pairs)))
        return [g for g in groups if g]

    def rehearsal_examples(self, job: TrainingJob) -> list[ex.Example]:
        """The base's answers a rehearsing job is held to (none without rehearsal or a weight)."""
        if not (job.rehearse and self.rehearsal is not None and self.anchoring.weight > 0):
            return []
        pairs = self.rehearsal.sample(self.lm, job.directives.seed, self.host, stop=self.stopping)
        prompts = [(_as_prompt(self.lm, p), c) for p, c in pairs]
        return ex.completion_examples(self.lm.tokenizer, prompts, job.directives.max_seq_len)

    def train(self, job: TrainingJob) -> TrainedAdapter:
        with self._lock:
            work_begins()  # the wait for another message's training is not this one's work
            try:
                return self._train_or_reuse(job)
            except BaseException:
                shutil.rmtree(self.outputs / job.adapter_id, ignore_errors=True)  # nothing to upload
                raise

    def _train_or_reuse(self, job: TrainingJob) -> TrainedAdapter:
        key = self.training_key(job)
        done = self._trained.get(key)
        if done is not None and (done[0] / ADAPTER_WEIGHTS).is_file():
            self._trained.move_to_end(key)
            return self._rescaled(job, *done)
        result = self._train(job)
        self._remember(key, result)
        _scaled(result.directory, job)
        return replace(result, adapter_scale=job.directives.adapter_scale)

    def training_key(self, job: TrainingJob) -> str:
        """What determines the trained weights: the job without its id and ``adapter_scale``."""
        parent = None
        if job.parent_dir is not None:
            weights = Path(job.parent_dir) / ADAPTER_WEIGHTS
            parent = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else str(job.parent_dir)
        what = {
            "directives": job.directives.model_dump(mode="json", exclude={"adapter_scale"}),
            "texts": job.texts,
            "pairs": job.pairs,
            "replay": job.replay if job.replay_per_epoch > 0 else (),
            "replay_per_epoch": job.replay_per_epoch if job.replay else 0,
            "parent": parent,
            "rehearse": job.rehearse,
            "rehearsal": (self.rehearsal.prompts, self.rehearsal.count) if self.rehearsal else None,
            "anchoring": (self.anchoring.weight, self.anchoring.batch),
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def _remember(self, key: str, result: TrainedAdapter) -> None:
        keep = self._unscaled / key[:32]
        if keep.exists():
            shutil.rmtree(keep)
        shutil.copytree(result.directory, keep)
        self._trained[key] = (keep, result)
        while len(self._trained) > KEEP_TRAINED:
            _, (old, _) = self._trained.popitem(last=False)
            shutil.rmtree(old, ignore_errors=True)

    def _output_dir(self, adapter_id: str) -> Path:
        """Where a job's PEFT directory is written (emptied of an earlier attempt's)."""
        out = self.outputs / adapter_id
        if out.exists():
            shutil.rmtree(out)
        return out

    def _rescaled(self, job: TrainingJob, unscaled: Path, trained: TrainedAdapter) -> TrainedAdapter:
        out = self._output_dir(job.adapter_id)
        shutil.copytree(unscaled, out)
        _scaled(out, job)
        log.info(
            "adapter %s: the training of %s scaled by %.2f (not trained again)",
            job.adapter_id, trained.directory.name, job.directives.adapter_scale,
        )
        return replace(trained, directory=out, adapter_scale=job.directives.adapter_scale, reused_from=trained.directory.name)

    def _train(self, job: TrainingJob) -> TrainedAdapter:
        examples = self.examples_for(job)
        if not examples:
            raise TrainingRejected("nothing to train on: no example has a token to learn")
        rehearsal = self.rehearsal_examples(job)
        d = job.directives
        replay = ex.replay_schedule(self.replay_examples(job), job.replay_per_epoch, d.epochs, d.seed)
        _seed(d.seed)
        try:
            lora = self._put_adapter(job)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            if job.adapter_id in self.host.names:
                self.host.remove(job.adapter_id)
            if isinstance(exc, (torch.OutOfMemoryError, OSError)):
                raise  # the device or the disk now (a parent folder gone, say), not for good: transient
            what = "the parent adapter does not load" if job.parent_dir else "no LoRA fits"
            raise TrainingRejected(f"{what} on this base model: {exc}") from exc
        device = self.lm.device
        anchor = (
            KlAnchor(
                self.host,
                rehearsal,
                weight=self.anchoring.weight,
                batch=self.anchoring.batch,
                pad_id=_pad_id(self.lm),
                device=device,
                pass_tokens=max(self.layout.pass_tokens, d.max_seq_len),
            )
            if rehearsal
            else None
        )
        _reset_peak_memory(device)
        plan = [
            ex.plan_epoch(
                examples + replay[epoch],
                batch_size=d.batch_size,
                row_tokens=max(self.layout.row_tokens, d.max_seq_len),
                pass_tokens=max(self.layout.pass_tokens, d.max_seq_len),
                pad_id=_pad_id(self.lm),
                seed=d.seed + epoch,
            )
            for epoch in range(d.epochs)
        ]
        try:
            run = fit(
                self.host.model,
                self.host.trainable_parameters(),
                plan,
                learning_rate=d.learning_rate,
                device=device,
                on_epoch=lambda e, n, loss: log.info(
                    "adapter %s: epoch %d/%d loss %.4f", job.adapter_id, e, n, loss
                ),
                pause_s=self.layout.step_pause_s,
                anchor=anchor,
                stop=self.stopping,
            )
            # How far the model moved from the base on the rehearsal answers: the mean of the
            # anchor's terms over the last epoch (no extra pass over all of them).
            last = run.anchor_curve[-len(plan[-1]):] if plan and plan[-1] else []
            held = sum(last) / len(last) if anchor is not None and last else None
            peak, kind = _peak_memory(device)
            out = self._output_dir(job.adapter_id)
            self.host.save(job.adapter_id, out)
        except NonFiniteTraining as exc:
            raise TrainingRejected(f"training diverged: {exc}") from exc
        finally:
            self.host.remove(job.adapter_id)
        return TrainedAdapter(
            directory=out,
            run=run,
            lora=lora,
            examples=len(examples),
            rehearsal_examples=len(rehearsal),
            rehearsal_kl=held,
            truncated=sum(e.truncated for e in examples),
            device=str(device),
            dtype=str(next(self.lm.model.parameters()).dtype).removeprefix("torch."),
            peak_memory_bytes=peak,
            peak_memory_kind=kind,
            versions=_versions(),
            replayed_per_epoch=len(replay[0]) if replay else 0,
        )

    def _put_adapter(self, job: TrainingJob) -> dict[str, Any]:
        d = job.directives
        if job.parent_dir is not None:
            config = self.host.load(job.adapter_id, job.parent_dir, trainable=True)
            origin = "parent"
        else:
            config = lora_config(
                self.lm.model, rank=d.lora_rank, alpha=d.lora_alpha, target_modules=d.target_modules
            )
            self.host.add_fresh(job.adapter_id, config)
            origin = "fresh"
        targets = config.target_modules
        return {
            "origin": origin,
            "r": config.r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            # PEFT resolves "all-linear" to full module paths; the layer names say the same, shorter.
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets})
            if isinstance(targets, (set, list, tuple))
            else targets,
        }


def _as_prompt(lm: LoadedModel, prompt: str) -> str:
    """A policy prompt as the generator asks it: the user text through the chat template
    (as :func:`shared.generation.chat_prompt` does). A prompt that already starts the
    way the template starts is taken as formatted and used as is."""
    if not lm.tokenizer.chat_template:
        return prompt
    rendered = chat_prompt(lm, "\x00")
    head = rendered.split("\x00")[0].split("\n")[0]
    return prompt if head and prompt.startswith(head) else chat_prompt(lm, prompt)


def _pad_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return int(pad if pad is not None else lm.tokenizer.eos_token_id)


def _scaled(directory: Path, job: TrainingJob) -> None:
    """:func:`scale_update` for a job. An adapter that does not match its parent is the job's
    fault, the same on every try (a failed training, said once); a parent file gone (OSError) is
    not, and is retried."""
    try:
        scale_update(directory, job.directives.adapter_scale, job.parent_dir)
    except ValueError as exc:
        raise TrainingRejected(f"the trained adapter cannot be made {job.directives.adapter_scale:g} strong: {exc}") from exc


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak GPU memory allocated during this job, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kb) * (1 if sys.platform == "darwin" else 1024), "process_peak_rss"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
