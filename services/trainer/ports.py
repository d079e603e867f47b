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
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

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

    async def claim(self, key: str, owner: str, stale_s: float) -> bool:
        """Hold ``key`` for ``owner``: True if it was free, is ``owner``'s already, or was
        held longer than ``stale_s`` seconds by another (taken over); False if another holds it."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give up ``owner``'s claim on ``key`` (nothing if another holds it)."""
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

    async def claim(self, key: str, owner: str, stale_s: float) -> bool:
        kv = await self.js.key_value(self.bucket)
        mine = claim_value(owner)
        try:
            await kv.create(key, mine)
            return True
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # given up between the two calls: free, taken on the next try
                return False
        if not claim_lost(entry.value, owner):
            return True
        if not claim_stale(entry.value, stale_s):
            return False
        try:
            await kv.update(key, mine, last=entry.revision)
            return True
        except KeyWrongLastSequenceError:  # another took it over first
            return False

    async def release(self, key: str, owner: str) -> None:
        kv = await self.js.key_value(self.bucket)
        try:
            entry = await kv.get(key)
            if not claim_lost(entry.value, owner):
                await kv.delete(key, last=entry.revision)
        except (KeyNotFoundError, KeyWrongLastSequenceError):
            pass


def claim_value(owner: str) -> bytes:
    return json.dumps({"owner": owner, "at": time.time()}).encode()


def _held(value: bytes | None) -> dict | None:
    try:
        held = json.loads(value or b"")
    except ValueError:
        return None
    return held if isinstance(held, dict) else None


def claim_lost(value: bytes | None, owner: str) -> bool:
    """Whether a claim's stored ``value`` keeps ``owner`` out (another's claim)."""
    held = _held(value)
    return held is None or held.get("owner") != owner


def claim_stale(value: bytes | None, stale_s: float) -> bool:
    """Whether a stored claim is older than ``stale_s`` seconds (or unreadable): its holder is
    taken for gone."""
    held = _held(value)
    at = held.get("at") if held else None
    return not isinstance(at, int | float) or time.time() - at > stale_s


class ParentCache:
    """Parent adapters downloaded once, integrity-checked, kept by manifest digest."""

    def __init__(self, storage: AdapterStorage, directory: Path, size: int = 16):
        self.storage = storage
        self.directory = Path(directory)
        self.size = size
        # Fetches run in threads (a self-edit, a rebase and a policy request at once): a second
        # download of the same parent would replace the folder while the first job loads it.
        self._lock = threading.Lock()

    def fetch(self, ref: ManifestRef) -> tuple[Path, AdapterManifest]:
        """The parent's PEFT directory; raises IntegrityError / AdapterNotFound."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            target = self.directory / ref.manifest_sha256
            if (target / MANIFEST).exists():
                target.touch()
                return target, AdapterManifest.model_validate_json((target / MANIFEST).read_text())
            manifest = self.storage.get_adapter(ref, target)
            self._prune(keep=target)
            return target, manifest

    def _prune(self, keep: Path) -> None:
        kept = sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[self.size :]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
