"""Batched text generation through the model's chat template.

Shared by the generator (sampling self-edits) and the evaluator (greedy
closed-book answers), so both ask the model the same way. Prompts are
left-padded and run in batches; generation stops on end-of-turn and
end-of-text alike. A set ``stop`` flag (the process is shutting down) ends a
batch at its next token and raises :class:`~shared.shutdown.Interrupted`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from shared.models import LoadedModel
from shared.shutdown import Interrupted

log = logging.getLogger(__name__)


def chat_prompt(lm: LoadedModel, user_text: str, system: str | None = None) -> str:
    """The text that asks the model ``user_text`` as one chat turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_text})
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 32,
    seed: int | None = None,
    max_prompt_tokens: int = 1536,
    stop: threading.Event | None = None,
) -> list[list[str]]:
    """Complete every prompt; returns ``num_return_sequences`` texts per prompt.

    ``temperature == 0`` is greedy decoding. Special tokens are stripped.
    ``stop``: once set, generation ends at the next token and raises ``Interrupted``.
    """
    tokenizer = lm.tokenizer
    if seed is not None:
        torch.manual_seed(seed)
    previous_side, previous_cut = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"
    # A prompt over the budget loses its beginning, not its end: the end holds the assistant's
    # turn (and any prefill) that makes the model answer rather than continue the text.
    tokenizer.truncation_side = "left"
    results: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            _check(stop, start, len(prompts))
            chunk = list(prompts[start : start + batch_size])
            for prompt in chunk:
                if (length := len(tokenizer(prompt, add_special_tokens=False)["input_ids"])) > max_prompt_tokens:
                    log.warning("a prompt of %d tokens is cut to its last %d", length, max_prompt_tokens)
            batch = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt_tokens,
                add_special_tokens=False,
            ).to(lm.device)
            sampling = temperature > 0
            output = lm.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=None,
                num_return_sequences=num_return_sequences,
                eos_token_id=lm.stop_token_ids,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_UntilSet(stop)]) if stop is not None else None,
            )
            _check(stop, start, len(prompts))
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i in range(len(chunk)):
                results.append(
                    [t.strip() for t in texts[i * num_return_sequences : (i + 1) * num_return_sequences]]
                )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = previous_side, previous_cut
    return results


class _UntilSet(StoppingCriteria):
    """Ends every sequence of the batch once the flag is set."""

    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


def _check(stop: threading.Event | None, done: int, total: int) -> None:
    if stop is not None and stop.is_set():
        raise Interrupted(f"generation stopped with {done} of {total} prompts answered")
