"""Evaluator service: what an update taught, what it broke, and the reward.

Consumes ``adapter.trained``; verifies the adapter (manifest sums, finite
weights, same base model), scores candidate and parent closed-book with
:mod:`shared.scoring`, and publishes ``adapter.evaluated`` (scores, reward,
verdict per gate, reasons) or ``adapter.evaluation_failed``.
"""
