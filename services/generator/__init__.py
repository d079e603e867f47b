"""Generator service: the model writes its own self-edits from feedback.

SEAL's first step. A ``feedback.submitted`` event (a passage to learn, a
correction, a preference) becomes ``k`` candidate self-edits: training
sequences the model wrote itself (implications, rewrites, self-QA), each
with training directives and the probes the evaluator will ask. Every
candidate is validated before anything is trained on it; failures are
published as ``selfedit.rejected`` with readable reasons.

Modules, from the domain inwards:

* :mod:`.feedback`: reading an untrusted ``feedback.submitted`` payload.
* :mod:`.prompts`: SEAL's self-edit prompts per format.
* :mod:`.parsing`: completions to training sequences and directives.
* :mod:`.screening`: PII, prompt-injection and blocklist checks.
* :mod:`.validation`: bounds, duplicates, grounding; the verdict per candidate.
* :mod:`.probes`: grounded probe questions when the product sends none.
* :mod:`.candidates`: feedback + scope policy + completions -> events.
* :mod:`.writer`: the base model plus the scope's policy adapter, sampling.
* :mod:`.handlers`: one feedback message, idempotently, with ports.
* :mod:`.app`: wiring (broker, KV, object store, model).

Run: ``python -m services.generator`` (settings from ``SEAL_*`` variables).
"""
