"""One upload per adapter id, however many trainers trained it.

Two trainers can train the same adapter id: a redelivery after a missed beat, or two consumer
groups (a canary pool) on the same self-edits. Their manifests differ (times, trace), so two
uploads would leave a manifest other than the one announced, or one trainer's checksums over
the other's files. A claim in the idempotency bucket lets one upload; the other waits and
announces what was stored, or takes the claim over if its holder gave it up (a failed upload)
or went quiet past the claim's limit, and uploads its own training.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from services.trainer.ports import AdapterStorage, ParentLedger
from shared.events import ManifestRef
from shared.shutdown import Interrupted
from shared.store import AdapterManifest

log = logging.getLogger(__name__)

# An upload claim older than this is taken for a trainer that died mid-upload (an upload takes
# seconds; the claim is taken after training, just before it).
UPLOAD_CLAIM_STALE_S = 600.0


async def store_once(
    store: AdapterStorage,
    ledger: ParentLedger,
    owner: str,
    uri: str,
    directory: Path,
    manifest: AdapterManifest,
    *,
    wait_s: float,
    stopping: Callable[[], bool],
) -> tuple[ManifestRef, AdapterManifest]:
    """Store the adapter trained in ``directory`` unless another trainer stores (or stored) this
    adapter id; the reference and manifest as stored, read back, which is what the event must
    carry. ``directory`` is removed in any case."""
    key = f"trainer.upload.{manifest.adapter_id}"
    deadline = time.monotonic() + wait_s
    waited = uploading = False
    try:
        while True:
            if await asyncio.to_thread(store.exists, uri):
                # Stored already: by the claim's holder, or by a trainer whose claim this one took
                # over as stale. What is stored stands; storing over it would change what was announced.
                return await asyncio.to_thread(store.stored, uri)
            if await ledger.claim(key, owner, UPLOAD_CLAIM_STALE_S):
                uploading = True
                await _upload(store, ledger, owner, key, directory, manifest)
                return await asyncio.to_thread(store.stored, uri)
            if not waited:
                log.warning("adapter %s is being stored by another trainer; waiting for its upload", manifest.adapter_id)
                waited = True
            if stopping():
                raise Interrupted(f"the trainer is stopping while adapter {manifest.adapter_id} is stored by another")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"adapter {manifest.adapter_id} is being stored by another trainer and was not stored after "
                    f"{wait_s:.0f}s; a redelivery looks again"
                )
            await asyncio.sleep(1.0)
    finally:
        if not uploading:  # the upload's thread removes it when it is done, even if this is cancelled
            shutil.rmtree(directory, ignore_errors=True)


async def _upload(
    store: AdapterStorage, ledger: ParentLedger, owner: str, key: str, directory: Path, manifest: AdapterManifest
) -> None:
    def put_then_remove() -> None:
        try:
            store.put_adapter(directory, manifest)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    try:
        await asyncio.to_thread(put_then_remove)
    except Exception:
        # Another trainer may take the redelivery: it must not wait out the claim. (A cancelled
        # upload keeps its claim: its thread may still be writing.)
        await ledger.release(key, owner)
        raise
