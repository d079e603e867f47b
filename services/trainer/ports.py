"""What the trainer's handlers need from the world, and the real implementations.

* :class:`AdapterStorage`: the object store (:class:`StoredAdapters` wraps
  :class:`shared.store.AdapterStore`).
* :class:`RegistryReader`: the scope's active adapter and policy adapter, read
  from the registry's KV bucket (:class:`KvRegistryReader`).
* :class:`ParentLedger`: pins which parent a self-edit was trained on, so a
  redelivered self-edit builds on the same parent (and so gets the same
  adapter id) even if the active version changed meanwhile
  (:class:`KvParentLedger`, in the shared idempotency bucket).
* :class:`ParentCache`: verified parent adapters on local disk.

Tests pass in-memory fakes with the same methods.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError

from shared.events import ManifestRef
from shared.registry_view import ActiveAdapter, PolicyAdapterRef, read_active, read_policy_adapter
from shared.store import MANIFEST, AdapterManifest, AdapterStore, parse_manifest
from shared.subjects import KV_IDEMPOTENCY

log = logging.getLogger(__name__)


class AdapterStorage(Protocol):
    def uri_for(self, scope: str, adapter_id: str) -> str: ...
    def exists(self, uri: str) -> bool: ...
    def stored(self, uri: str) -> tuple[ManifestRef, AdapterManifest]: ...
    def put_adapter(self, local_dir: Path, manifest: AdapterManifest) -> ManifestRef: ...
    def get_adapter(self, ref: ManifestRef | str, dest: Path) -> AdapterManifest: ...


class RegistryReader(Protocol):
    async def active(self, scope: str) -> ActiveAdapter | None: ...
    async def policy(self, scope: str) -> PolicyAdapterRef | None: ...


class ParentLedger(Protocol):
    async def pin(self, key: str, value: bytes) -> bytes:
        """Store ``value`` under ``key`` unless something is there; return what is there."""
        ...


class StoredAdapters:
    """:class:`AdapterStore` plus reading back the reference of a stored adapter."""

    def __init__(self, store: AdapterStore):
        self.store = store

    def uri_for(self, scope: str, adapter_id: str) -> str:
        return self.store.uri_for(scope, adapter_id)

    def exists(self, uri: str) -> bool:
        return self.store.exists(uri)

    def stored(self, uri: str) -> tuple[ManifestRef, AdapterManifest]:
        """The stored manifest's reference and content, from one read (a write between two reads
        made them disagree)."""
        body = self.store.manifest_bytes(uri)
        return ManifestRef(uri=uri, manifest_sha256=hashlib.sha256(body).hexdigest()), parse_manifest(body, uri)

    def put_adapter(self, local_dir: Path, manifest: AdapterManifest) -> ManifestRef:
        return self.store.put_adapter(local_dir, manifest)

    def get_adapter(self, ref: ManifestRef | str, dest: Path) -> AdapterManifest:
        return self.store.get_adapter(ref, dest)


class KvRegistryReader:
    def __init__(self, js: JetStreamContext):
        self.js = js

    async def active(self, scope: str) -> ActiveAdapter | None:
        return await read_active(self.js, scope)

    async def policy(self, scope: str) -> PolicyAdapterRef | None:
        return await read_policy_adapter(self.js, scope)


class KvParentLedger:
    def __init__(self, js: JetStreamContext, bucket: str = KV_IDEMPOTENCY):
        self.js = js
        self.bucket = bucket

    async def pin(self, key: str, value: bytes) -> bytes:
        kv = await self.js.key_value(self.bucket)
        try:
            await kv.create(key, value)
            return value
        except KeyWrongLastSequenceError:
            entry = await kv.get(key)
            return entry.value or value


class ParentCache:
    """Parent adapters downloaded once, integrity-checked, kept by manifest digest."""

    def __init__(self, storage: AdapterStorage, directory: Path, size: int = 16):
        self.storage = storage
        self.directory = Path(directory)
        self.size = size

    def fetch(self, ref: ManifestRef) -> tuple[Path, AdapterManifest]:
        """The parent's PEFT directory; raises IntegrityError / AdapterNotFound."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / ref.manifest_sha256
        if (target / MANIFEST).exists():
            target.touch()
            return target, AdapterManifest.model_validate_json((target / MANIFEST).read_text())
        manifest = self.storage.get_adapter(ref, target)
        self._prune()
        return target, manifest

    def _prune(self) -> None:
        kept = sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[self.size :]:
            shutil.rmtree(old, ignore_errors=True)
