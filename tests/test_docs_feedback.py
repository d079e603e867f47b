"""docs/feedback.md, what product teams read to send feedback: every example in it is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.registry.operations import SubmitFeedback
from shared import events as ev

DOC = Path(__file__).resolve().parent.parent / "docs" / "feedback.md"


def test_every_json_example_is_a_valid_feedback_event() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    kinds = []
    for block in blocks:
        event = ev.parse_event(block.encode())
        assert isinstance(event, ev.FeedbackSubmitted)
        kinds.append(event.content.kind)
    assert kinds == ["knowledge", "correction", "preference"]


def test_the_http_example_is_a_valid_submission() -> None:
    body = re.search(r"-d '(\{.*?\})'", DOC.read_text(), flags=re.S)
    assert body is not None
    submitted = SubmitFeedback.model_validate(json.loads(body.group(1)))
    assert submitted.content.kind == "correction" and submitted.feedback_id == "ticket-48151"


def test_the_limits_it_states_are_the_schemas() -> None:
    text = DOC.read_text()
    assert ev.KnowledgeFeedback.model_fields["probes"].metadata[0].max_length == 50 and "| 50, with 20,000" in text
    from shared.contracts import LONG_TEXT_CHARS, MAX_FEEDBACK_PROBE_CHARS

    assert (LONG_TEXT_CHARS, MAX_FEEDBACK_PROBE_CHARS) == (20_000, 20_000)
    from shared.subjects import FEEDBACK_SUBMITTED, STREAMS

    assert f"`{FEEDBACK_SUBMITTED}`" in text
    assert STREAMS[0].duplicate_window.total_seconds() == 600 and "duplicate window (10\nminutes)" in text
