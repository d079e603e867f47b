"""Work stopped because its process is shutting down.

A service told to stop (SIGTERM: a rolling update, a node drained) should not
run a long job (generation, training, evaluation) past the pod's grace period
only to be killed and have its message wait out the consumer's ``ack_wait``.
Each long job checks a stop flag as it goes (between optimizer steps, at every
generated token) and raises :class:`Interrupted` once it is set; the broker's
middleware hands the message back to JetStream at once (a negative
acknowledgement, not counted as a failure), so another replica takes it
straight away. Nothing half-done is published: the job simply did not happen.
"""

from __future__ import annotations


class Interrupted(Exception):
    """The job was stopped before it finished: the process is shutting down."""
