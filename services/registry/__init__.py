"""Registry: where the platform decides, records and undoes what it learned.

It collects the outcome of every candidate of a feedback event (evaluated,
failed, rejected), picks the best candidate that passed every gate, promotes
it as the scope's next version (or holds it for approval, or sends it back
for training when the active version moved underneath it), and keeps the
lineage both ways: version -> evaluation -> training run -> self-edit ->
feedback, and feedback -> what became of it.

State lives in JetStream KV; every write is a compare-and-set. Keys in the
``seal_registry`` bucket (ids are encoded by :func:`records.key_token`):

* ``active.<scope>``: the scope head, a superset of
  :class:`shared.registry_view.ActiveAdapter` (active, previous and latest
  version, pin, recent promotions). Readers that parse it as ``ActiveAdapter``
  ignore the extra fields. The commit point of every promotion and rollback.
* ``probes.<scope>``: :class:`shared.registry_view.AcceptedProbes`, rebuilt
  from the version chain on promotion and on rollback.
* ``policy.<scope>`` / ``policy._global``: the generator's policy adapter (a scope's own; the
  platform-wide fallback, put there by an operator only).
* ``policypool.<scope>``: :class:`outer_loop.PolicyPool`, rewarded self-edits
  waiting for the scope's next outer-loop round (when the policy turns it on).
* ``version.<scope>.<n>``: :class:`records.VersionRecord`, the tags of one
  version (scores, reward, feedback ids, trace ids, base model, probes).
* ``feedback.<scope>.<feedback>``: :class:`records.FeedbackRecord`, the
  lineage root: the feedback, its candidates and their outcomes, the
  decision and an outbox of events still to publish.
* ``open.<scope>.<feedback>``: an index of feedback not yet decided
  (swept for decision timeouts).
* ``selfedit.<scope>.<feedback>.<index>``: :class:`records.SelfEditRecord`,
  the self-edit of one candidate and the prompt it was written from (needed
  to rebase it and for the outer loop; also lineage). Registries before
  2026-11-27 wrote ``selfedit.<feedback>.<index>``; those are still read.
* ``arrived.<scope>.<first seen, UTC>.<feedback>``: an index of every feedback
  by when the registry first heard of it; listings walk it from the newest key
  and give a record without one (written before the index) its key.
* ``seen.<scope>``: a marker that the scope exists.

Scope policies live in the ``seal_scope_settings`` bucket under ``<scope>``.
"""
