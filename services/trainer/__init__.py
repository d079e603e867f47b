"""The trainer: SEAL's inner loop as a service (runs on GPU nodes).

Consumes ``selfedit.generated``, ``training.rebase_requested`` and
``policy.training_requested``; trains a LoRA adapter on the one base model it
keeps loaded; stores the adapter (PEFT directory + manifest) in object
storage; publishes ``adapter.trained`` / ``adapter.training_failed`` /
``policy.trained``.

Run: ``python -m services.trainer`` (settings from ``SEAL_*`` variables, see
:mod:`services.trainer.settings`). Modules, top down: ``app`` (wiring),
``handlers`` (events in, events out), ``lora_training`` (one update on the
base model), ``inner_loop`` (the optimization loop), ``examples``
(tokenization, packing, loss masks), ``ports`` (store, registry, ledger).
"""
