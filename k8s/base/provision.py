"""Create the JetStream streams, KV buckets and the adapter bucket, then exit.

Runs as an init container of every SEAL pod (mounted from the ``seal-provision``
ConfigMap), with the pod's own settings: environment from ``seal-config`` and
secrets from /run/secrets/seal. Every step is idempotent, so any number of pods
may run it at once; it retries while NATS or the object store is still starting.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.broker import ensure_streams_at
from shared.settings import ServiceSettings
from shared.store import AdapterStore

log = logging.getLogger("seal.provision")


def provision(settings: ServiceSettings, attempts: int, delay_s: float) -> None:
    for attempt in range(1, attempts + 1):
        try:
            asyncio.run(ensure_streams_at(settings.nats))
            AdapterStore.from_settings(settings.store).ensure_bucket()
            log.info("streams, key-value buckets and bucket %r are in place", settings.store.bucket)
            return
        except Exception as exc:  # noqa: BLE001 - dependencies may still be starting
            if attempt == attempts:
                raise
            log.warning("provisioning attempt %d/%d failed: %s", attempt, attempts, exc)
            time.sleep(delay_s)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    provision(ServiceSettings(), attempts=60, delay_s=5.0)
