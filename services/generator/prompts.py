"""What the model is asked, per self-edit format.

The knowledge formats follow SEAL's SQuAD knowledge-incorporation prompts:
*implications* (what follows from the passage), *rewrite* (the passage said
again in other ways) and *self-QA* (the passage as question-answer pairs).
They are asked as one user turn through the model's chat template; the
assistant's turn may be pre-filled (``prefill``) so that a small model starts
in the expected shape. Corrections and preferences have prompts of their
own. When the scope lets the model propose its training directives, one more
line asks for them as JSON (SEAL's few-shot self-edits did the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.events import CorrectionFeedback, KnowledgeFeedback, PreferenceFeedback

KnowledgeFormat = Literal["implications", "rewrite", "self_qa"]
KNOWLEDGE_FORMATS: tuple[KnowledgeFormat, ...] = ("implications", "rewrite", "self_qa")


@dataclass(frozen=True)
class Prompt:
    """One user turn, plus the start of the answer the model continues from."""

    text: str
    prefill: str = ""


KNOWLEDGE_TEMPLATES: dict[str, str] = {
    "implications": (
        "Let's read the following passage and produce a list of implications derived directly "
        "or indirectly from its content. Write one implication per line.\n\n"
        "Passage:\n{passage}"
    ),
    "rewrite": (
        "Let's read the following passage and rewrite it in a few different ways, "
        "each rewrite on its own line.\n\n"
        "Passage:\n{passage}"
    ),
    "self_qa": (
        "Let's read the following passage and rewrite it in a question-answer format. "
        "Write each pair as 'Question: ...' followed by 'Answer: ...'.\n\n"
        "Passage:\n{passage}"
    ),
}
KNOWLEDGE_PREFILL: dict[str, str] = {"implications": "", "rewrite": "", "self_qa": "Question:"}

CORRECTION_TEMPLATE = (
    "A question was answered wrongly. Learn the correct answer.\n\n"
    "Question: {question}\n{wrong}Correct answer: {right}\n\n"
    "State the correct fact in a few different sentences, one per line. "
    "Every sentence must contain the correct answer."
)

PREFERENCE_TEMPLATE = (
    "Here is an instruction about how to respond:\n{instruction}\n\n{examples}"
    "Write new examples of a user message and a response that follows the instruction. "
    "Write each example as 'User: ...' followed by 'Assistant: ...'."
)

DIRECTIVES_REQUEST = (
    "\n\nFinally, on its own last line, propose how to train on what you wrote, as JSON, "
    'for example: {"learning_rate": 0.0001, "epochs": 3, "lora_rank": 8}'
)


# The most of a passage a writing prompt shows: with the template it stays inside the writer's
# prompt budget (``max_prompt_tokens``, 1536) for English text. A longer passage's self-edit is
# written from its beginning (cut at a sentence end); the trainer still trains on all of it.
MAX_PROMPT_PASSAGE_CHARS = 4000


def passage_block(title: str | None, passage: str) -> str:
    return f"{title}\n{passage}" if title else passage


def prompt_passage(passage: str, limit: int = MAX_PROMPT_PASSAGE_CHARS) -> str:
    """``passage``, or as many of its first sentences as fit in ``limit`` characters."""
    if len(passage) <= limit:
        return passage
    head = passage[:limit]
    end = max(head.rfind(". "), head.rfind(".\n"), head.rfind("? "), head.rfind("! "))
    return head[: end + 1] if end > limit // 2 else head


def knowledge_prompt(fmt: KnowledgeFormat, content: KnowledgeFeedback, propose_directives: bool) -> Prompt:
    text = KNOWLEDGE_TEMPLATES[fmt].format(passage=passage_block(content.title, prompt_passage(content.passage)))
    return Prompt(text + (DIRECTIVES_REQUEST if propose_directives else ""), KNOWLEDGE_PREFILL[fmt])


def correction_prompt(content: CorrectionFeedback, propose_directives: bool) -> Prompt:
    wrong = f"Wrong answer given: {content.wrong_answer}\n" if content.wrong_answer else ""
    text = CORRECTION_TEMPLATE.format(question=content.question, wrong=wrong, right=content.right_answer)
    return Prompt(text + (DIRECTIVES_REQUEST if propose_directives else ""))


# A preference prompt shows the instruction and its first examples within the writer's prompt
# budget as well: unbounded, 20,000 characters of instruction and four long examples made a
# prompt longer than an event may carry, and the writer's left cut lost the instruction itself.
MAX_PROMPT_INSTRUCTION_CHARS = 2000
MAX_PROMPT_EXAMPLE_CHARS = 1000


def preference_prompt(content: PreferenceFeedback, propose_directives: bool) -> Prompt:
    shown = "".join(
        f"User: {prompt_passage(ex.prompt, MAX_PROMPT_EXAMPLE_CHARS // 2)}\n"
        f"Assistant: {prompt_passage(ex.response, MAX_PROMPT_EXAMPLE_CHARS)}\n\n"
        for ex in content.examples[:4]
    )
    examples = f"Examples:\n{shown}" if shown else ""
    text = PREFERENCE_TEMPLATE.format(
        instruction=prompt_passage(content.instruction, MAX_PROMPT_INSTRUCTION_CHARS), examples=examples
    )
    return Prompt(text + (DIRECTIVES_REQUEST if propose_directives else ""), "User:")
