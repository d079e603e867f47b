"""From a feedback and the scope's policy to k candidate self-edits.

:func:`plan_candidates` decides what to ask (one prompt per candidate, the
format fixed by the scope or sampled); the model answers all of them in one
batched call (:mod:`.writer`); :func:`candidate_events` turns the answers
into one event per candidate: ``selfedit.generated`` with its sequences,
directives and probes, or ``selfedit.rejected`` with its reasons. Candidates
with the same training data are tried at the decreasing strengths of the
scope's ``strength_ladder`` (``adapter_scale``) before any is a duplicate;
with ``ladder_per_training``, the rungs no candidate took are added as
candidates of their own (the same training, scaled), so every distinct
training data is evaluated at every strength, even with one candidate.

Everything here is deterministic given the feedback, the policy and the
completions: event ids derive from the feedback event and the candidate
index, so handling a redelivered feedback yields the very same events.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from services.generator.parsing import ParsedCompletion, clamp_directives, parse_completion, passage_sequences
from services.generator.probes import grounded_pairs, self_generated_probes
from services.generator.prompts import (
    KNOWLEDGE_FORMATS,
    Prompt,
    correction_prompt,
    knowledge_prompt,
    preference_prompt,
)
from services.generator.screening import feedback_texts
from services.generator.settings import GeneratorConfig
from services.generator.validation import Grounding, Limits, Verdict, validate_candidate
from shared.contracts import MAX_CANDIDATES
from shared.events import (
    CorrectionFeedback,
    Event,
    FeedbackSubmitted,
    KnowledgeFeedback,
    PreferenceFeedback,
    Probe,
    SelfEdit,
    SelfEditFormat,
    SelfEditGenerated,
    SelfEditRejected,
    TrainingDirectives,
    derived_id,
)
from shared.registry_view import ScopePolicy

log = logging.getLogger(__name__)

SEQUENCE_HARD_LIMIT = 4_000  # SelfEdit.sequences items
COMPLETION_HARD_LIMIT = 50_000  # SelfEdit.completion
PREFERENCE_PROBE_MAX_CHARS = 200


@dataclass(frozen=True)
class CandidatePlan:
    index: int
    format: SelfEditFormat
    prompt: Prompt


def feedback_seed(feedback_id: str) -> int:
    """The sampling seed of a feedback: a retry samples the very same candidates."""
    return int(hashlib.sha256(feedback_id.encode()).hexdigest()[:8], 16)


def self_edit_id(feedback: FeedbackSubmitted, index: int) -> str:
    """Stable on redelivery, and distinct across scopes and feedback (the trainer's adapter ids and
    parent pins derive from it), whatever event id a product chose."""
    return derived_id(feedback.scope, feedback.feedback_id, feedback.event_id, "self_edit", index)


def plan_candidates(feedback: FeedbackSubmitted, policy: ScopePolicy, seed: int) -> list[CandidatePlan]:
    """k prompts for one feedback; with the format "sampled", every format in turn, in a seeded order."""
    content, k = feedback.content, policy.candidates
    propose = policy.model_proposes_directives
    if isinstance(content, CorrectionFeedback):
        return [CandidatePlan(i, "correction", correction_prompt(content, propose)) for i in range(k)]
    if isinstance(content, PreferenceFeedback):
        return [CandidatePlan(i, "preference", preference_prompt(content, propose)) for i in range(k)]
    if policy.self_edit_format == "sampled":
        rng = random.Random(seed)
        formats: list[str] = []
        while len(formats) < k:
            round_ = list(KNOWLEDGE_FORMATS)
            rng.shuffle(round_)
            formats += round_
    else:
        formats = [policy.self_edit_format] * k
    return [CandidatePlan(i, fmt, knowledge_prompt(fmt, content, propose)) for i, fmt in enumerate(formats[:k])]  # type: ignore[arg-type]


def probes_for(feedback: FeedbackSubmitted, config: GeneratorConfig) -> tuple[Probe, ...]:
    """The product's probes; for a passage without any, grounded self-generated ones."""
    content = feedback.content
    if isinstance(content, KnowledgeFeedback):
        if content.probes:
            return content.probes
        return self_generated_probes(content.passage, content.title, config.self_probe_count)
    if isinstance(content, CorrectionFeedback):
        return (Probe(question=content.question, answer=content.right_answer, source="product"),)
    return tuple(
        Probe(question=ex.prompt, answer=ex.response, source="product")
        for ex in content.examples
        if len(ex.response) <= PREFERENCE_PROBE_MAX_CHARS
    )


# Characters a token of English text takes, at least, with SmolLM2's tokenizer (3.96 on average
# over the dev passages): a passage piece of max_seq_len * this many characters fits the training.
PASSAGE_CHARS_PER_TOKEN = 3.75


def passage_chunk_chars(config: GeneratorConfig, policy: ScopePolicy) -> int:
    """The longest piece of a passage to train on: one that fits the scope's sequence length
    (``max_seq_len`` tokens; a longer piece is cut by the trainer, and its end never trained),
    within the generator's own limit."""
    fits = int(policy.default_directives.max_seq_len * PASSAGE_CHARS_PER_TOKEN)
    return max(64, min(config.max_sequence_chars, fits))


def feedback_sequences(feedback: FeedbackSubmitted, limits: Limits) -> list[str]:
    """What the feedback itself contributes to every candidate (kept after the written pieces)."""
    content = feedback.content
    if isinstance(content, KnowledgeFeedback):
        return passage_sequences(content.title, content.passage, limits.passage_chars or limits.max_sequence_chars)
    if isinstance(content, CorrectionFeedback):
        sequences = [
            f"Question: {content.question}\nAnswer: {content.right_answer}",
            f'The answer to "{content.question}" is {content.right_answer}.',
        ]
    else:
        sequences = [f"User: {ex.prompt}\nAssistant: {ex.response}" for ex in content.examples]
    return [s for s in sequences if len(s) <= SEQUENCE_HARD_LIMIT]


def untrainable(feedback: FeedbackSubmitted, chunk_chars: int) -> list[str]:
    """What in a correction or a preference is too long to be trained (said, not dropped in silence:
    a preference example over the limit was left out, a correction's long question pushed its
    answer past the training's sequence length, so nothing of the answer was learned)."""
    content = feedback.content
    if isinstance(content, CorrectionFeedback):
        size = len(f"Question: {content.question}\nAnswer: {content.right_answer}")
        if size > chunk_chars:
            return [f"is too long to train on: its question and right answer are {size} characters together, "
                    f"more than one training sequence of this scope holds ({chunk_chars})"]
    elif isinstance(content, PreferenceFeedback):
        limit = SEQUENCE_HARD_LIMIT  # a longer response is cut by the trainer, not lost: its style still teaches
        long = [(i, n) for i, ex in enumerate(content.examples, 1) if (n := len(f"User: {ex.prompt}\nAssistant: {ex.response}")) > limit]
        if long:
            shown = ", ".join(f"example {i} ({n})" for i, n in long[:5])
            return [f"has examples too long to train on: {shown} characters as 'User: ...' and 'Assistant: ...', "
                    f"more than a training sequence may hold ({limit})"]
    return []


def grounded_sequences(feedback: FeedbackSubmitted, probes: Sequence[Probe], config: GeneratorConfig) -> list[str]:
    """For a passage: a question about each of its facts, answered by the sentence that states it.

    Written by rule from the passage, so grounded by construction; trained as
    chat turns (the trainer reads the "Question:/Answer:" shape), the shape the
    model is later asked in. A product's own probe questions are left out.
    """
    content = feedback.content
    if not isinstance(content, KnowledgeFeedback) or config.grounded_pairs == 0:
        return []
    product = tuple(p for p in probes if p.source == "product")
    pairs = grounded_pairs(
        content.passage, content.title, product, limit=config.grounded_pairs, ask_first=config.question_first
    )
    sequences = [f"Question: {p.question}\nAnswer: {p.reply}" for p in pairs]
    return [s for s in sequences if len(s) <= config.max_sequence_chars]


def kept_sequences(
    feedback: FeedbackSubmitted, probes: Sequence[Probe], config: GeneratorConfig, passage_chars: int | None = None
) -> list[str]:
    """What every candidate trains on beside its own written pieces: the grounded pairs (leaving
    room for at least one written piece) and the feedback's own sequences."""
    limits = Limits(config.max_sequences, config.max_sequence_chars, config.min_sequence_chars, passage_chars)
    own = feedback_sequences(feedback, limits)
    return grounded_sequences(feedback, probes, config)[: max(0, limits.max_sequences - len(own) - 1)] + own


def candidate_events(
    feedback: FeedbackSubmitted,
    policy: ScopePolicy,
    plans: Sequence[CandidatePlan],
    completions: Sequence[str],
    config: GeneratorConfig,
    generator_adapter: str | None = None,
) -> list[Event]:
    """One event per candidate, generated or rejected, in candidate order."""
    content = feedback.content
    limits = Limits(config.max_sequences, config.max_sequence_chars, config.min_sequence_chars)
    overlap = config.grounding_min_overlap * (0.5 if isinstance(content, PreferenceFeedback) else 1.0)
    grounding = Grounding.of(feedback_texts(content), overlap)
    probes = probes_for(feedback, config)
    kept = kept_sequences(feedback, probes, config, passage_chunk_chars(config, policy))
    title = content.title if isinstance(content, KnowledgeFeedback) else None
    must_contain = content.right_answer if isinstance(content, CorrectionFeedback) else None
    accepted: dict[tuple[str, ...], list[int]] = {}  # training data -> candidates that train on it
    ladder = policy.strength_ladder
    # First every candidate's verdict, so that the count (with any rungs added below) is known
    # before the first event: the registry waits for that many.
    judged: list[tuple[CandidatePlan, str, ParsedCompletion, Verdict, tuple[str, ...]]] = []
    for plan, completion in zip(plans, completions, strict=True):
        text = _joined(plan.prompt.prefill, completion)[:COMPLETION_HARD_LIMIT]
        parsed = parse_completion(plan.format, text, read_directives=policy.model_proposes_directives)
        verdict = validate_candidate(
            text,
            parsed.pieces,
            grounding=grounding,
            title=title,
            kept=kept,
            blocklist=policy.blocklist,
            limits=limits,
            must_contain=must_contain,
        )
        reasons = tuple(verdict.reasons or _duplicate_reason(verdict, accepted, ladder))
        if not reasons:
            accepted.setdefault(verdict.sequences, []).append(plan.index)
        log.info(
            "candidate %d/%d of %s (%s): %d written sequences kept, %d dropped%s",
            plan.index + 1, len(plans), feedback.feedback_id, plan.format, verdict.written,
            len(verdict.notes), f"; rejected: {'; '.join(reasons)}" if reasons else "",
        )
        judged.append((plan, text, parsed, verdict, reasons))
    # Rungs of the ladder that no candidate took, for each distinct training data: the same
    # training scaled down (the trainer does not train it again), one more evaluation each.
    rungs = ladder_rungs(list(accepted.values()), len(ladder), MAX_CANDIDATES - len(plans)) if policy.ladder_per_training else []
    count = len(plans) + len(rungs)
    by_index = {item[0].index: item for item in judged}

    def generated(index: int, source: int, rung: int) -> Event:
        plan, text, parsed, verdict, _ = by_index[source]
        directives = clamp_directives(parsed.proposed_directives, policy.default_directives, len(verdict.sequences))
        scale = max(TrainingDirectives.BOUNDS["adapter_scale"][0], directives.adapter_scale * ladder[rung])
        self_edit = SelfEdit(
            self_edit_id=self_edit_id(feedback, index),
            format=plan.format,
            completion=text,
            sequences=verdict.sequences,
            directives=directives.model_copy(update={"adapter_scale": scale}),
            candidate_index=index,
            candidate_count=count,
            written=verdict.written,
        )
        return feedback.caused(
            SelfEditGenerated, key=index, self_edit=self_edit, probes=probes,
            generator_adapter=generator_adapter,
            # The user turn the model completed; the completion holds the pre-filled start,
            # so (prompt, completion) is a ReST-EM example as the trainer renders it.
            generator_prompt=plan.prompt.text,
        )

    events: list[Event] = []
    for plan, _, _, verdict, reasons in judged:
        if reasons:
            events.append(
                feedback.caused(
                    SelfEditRejected,
                    key=plan.index,
                    self_edit_id=self_edit_id(feedback, plan.index),
                    candidate_index=plan.index,
                    candidate_count=count,
                    reasons=reasons,
                )
            )
        else:
            events.append(generated(plan.index, plan.index, accepted[verdict.sequences].index(plan.index)))
    for offset, (source, rung) in enumerate(rungs):
        index = len(plans) + offset
        log.info(
            "candidate %d/%d of %s: candidate %d's training at strength %g of the ladder",
            index + 1, count, feedback.feedback_id, source + 1, ladder[rung],
        )
        events.append(generated(index, source, rung))
    return events


def ladder_rungs(groups: Sequence[Sequence[int]], rungs: int, room: int) -> list[tuple[int, int]]:
    """(candidate, rung) for every rung that no candidate of a group (same training data, the
    first one's index first) took: all groups' second rung, then all third rungs, and so on, at
    most ``room`` of them, so that where there is no room for all, the gentlest go first."""
    missing = [(rung, order, group[0]) for order, group in enumerate(groups) for rung in range(len(group), rungs)]
    return [(source, rung) for rung, _, source in sorted(missing)][: max(0, room)]


def _joined(prefill: str, completion: str) -> str:
    if not prefill:
        return completion
    return f"{prefill} {completion}" if completion and not completion[0].isspace() else prefill + completion


def _duplicate_reason(
    verdict: Verdict, accepted: dict[tuple[str, ...], list[int]], ladder: Sequence[float]
) -> tuple[str, ...]:
    """Why a candidate is a duplicate: its training data was already tried at every strength."""
    earlier = accepted.get(verdict.sequences, [])
    if len(earlier) < len(ladder):
        return ()
    why = f"same training data as candidate {earlier[0]}, already tried at every strength of the ladder {tuple(ladder)}"
    if verdict.written == 0 and verdict.notes:
        why += f"; none of the {len(verdict.notes)} written pieces survived validation ({verdict.notes[0]})"
    elif verdict.written == 0:
        why += "; the completion held no usable piece"
    return (why,)
