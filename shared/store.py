"""Adapter storage on S3-compatible object storage (MinIO, SeaweedFS, AWS S3).

Layout of one adapter under ``s3://<bucket>/adapters/<scope>/<adapter_id>/``:

    adapter_config.json          PEFT directory, loadable as is by
    adapter_model.safetensors    PeftModel.from_pretrained, vLLM and LoRAX
    manifest.json                lineage, config, metrics, sha256 of every file

The manifest is written last, so an adapter without one is incomplete and is
never read. Every read checks the sha256 of every file against the manifest
and raises :class:`IntegrityError` on any difference. The client is the
blocking ``minio`` client: call it from async code through
``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error
from pydantic import BaseModel, ConfigDict, Field

from shared.events import ManifestRef
from shared.settings import StoreSettings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNK = 1 << 20
# What a stored adapter may hold before anything of it is downloaded: a manifest (its lineage
# included) and a handful of files; their bytes are bounded by the caller (the base's own size).
MAX_MANIFEST_BYTES = 16 << 20
MAX_ADAPTER_FILES = 16


class IntegrityError(Exception):
    """Stored bytes do not match their manifest: the adapter must not be used."""


class AdapterNotFound(LookupError):
    pass


class ManifestTooLarge(ValueError):
    """An adapter whose manifest would be too large to read back: not stored (the same every try)."""


class AdapterManifest(BaseModel):
    """What an adapter is and where it came from. Unknown keys are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")

    manifest_version: int = 1
    adapter_id: str
    scope: str
    kind: Literal["scope", "policy"] = "scope"
    base_model: str
    base_model_sha256: str | None = None
    parent_adapter_id: str | None = None
    feedback_ids: tuple[str, ...] = ()
    self_edit_id: str | None = None
    self_edit: dict[str, Any] | None = None
    directives: dict[str, Any] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    trace_id: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    files: dict[str, str] = Field(default_factory=dict)
    # Each file's size in bytes (manifests written before it have none): what a check without
    # downloading (:meth:`AdapterStore.read_checked_manifest`) compares.
    sizes: dict[str, int] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def adapter_prefix(scope: str, adapter_id: str) -> str:
    return f"adapters/{scope}/{adapter_id}"


def parse_manifest(body: bytes, uri: str) -> AdapterManifest:
    try:
        return AdapterManifest.model_validate_json(body)
    except ValueError as exc:
        raise IntegrityError(f"manifest of {uri} is not a valid manifest: {exc}") from exc


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// uri: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket or not prefix:
        raise ValueError(f"s3 uri needs a bucket and a key prefix: {uri!r}")
    return bucket, prefix.rstrip("/")


def http_client(settings: StoreSettings) -> urllib3.PoolManager:
    """The minio client's own HTTP pool (certificates from ``SSL_CERT_FILE`` or certifi, retries of
    5xx answers with backoff) with the settings' timeouts and number of retries."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=settings.retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class AdapterStore:
    def __init__(self, client: Minio, bucket: str):
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> "AdapterStore":
        client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=http_client(settings),
        )
        return cls(client, settings.bucket)

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def healthy(self) -> bool:
        try:
            self.client.bucket_exists(self.bucket)
            return True
        except Exception:  # noqa: BLE001 - health probes report, never raise
            return False

    # ------------------------------------------------------------------ write

    def put_adapter(self, local_dir: Path, manifest: AdapterManifest) -> ManifestRef:
        """Upload every file of ``local_dir``, then the manifest with their sums.

        Idempotent: putting the same adapter id again overwrites the same keys.
        """
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not files:
            raise ValueError(f"{local_dir} holds no files to store")
        prefix = adapter_prefix(manifest.scope, manifest.adapter_id)
        named = {path.relative_to(local_dir).as_posix(): path for path in files}
        sums = {name: sha256_file(path) for name, path in named.items()}
        sizes = {name: path.stat().st_size for name, path in named.items()}
        final = manifest.model_copy(update={"files": sums, "sizes": sizes})
        # UTF-8 as it is (escaped to ASCII, text outside it took up to 12 bytes a character).
        body = json.dumps(final.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False).encode()
        if len(body) > MAX_MANIFEST_BYTES:  # before anything is uploaded: no files without a manifest
            raise ManifestTooLarge(f"the manifest of {manifest.adapter_id} would be {len(body)} bytes, more than a "
                                   f"manifest may be read back ({MAX_MANIFEST_BYTES})")
        for name, path in named.items():
            self.client.fput_object(self.bucket, f"{prefix}/{name}", str(path), metadata={"sha256": sums[name]})
        self.client.put_object(
            self.bucket,
            f"{prefix}/{MANIFEST}",
            io.BytesIO(body),
            len(body),
            content_type="application/json",
        )
        return ManifestRef(
            uri=self.uri_for(manifest.scope, manifest.adapter_id), manifest_sha256=hashlib.sha256(body).hexdigest()
        )

    # ------------------------------------------------------------------- read

    def uri_for(self, scope: str, adapter_id: str) -> str:
        """Where an adapter of ``scope`` lives in this store (a parent's, from its id)."""
        return f"s3://{self.bucket}/{adapter_prefix(scope, adapter_id)}"

    def locate(self, uri: str) -> tuple[str, str]:
        """(bucket, key prefix) of an adapter's URI, which must be in this store's bucket: an event
        cannot send a service to read from another bucket (or a bucket name the client refuses)."""
        bucket, prefix = parse_uri(uri)
        if bucket != self.bucket:
            raise AdapterNotFound(f"{uri} is outside the platform's adapter bucket {self.bucket!r}")
        return bucket, prefix

    def exists(self, uri: str) -> bool:
        try:
            bucket, prefix = self.locate(uri)
        except AdapterNotFound:
            return False
        try:
            self.client.stat_object(bucket, f"{prefix}/{MANIFEST}")
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                return False
            raise

    def manifest_bytes(self, uri: str) -> bytes:
        """The stored manifest as it is, read with a size limit."""
        bucket, prefix = self.locate(uri)
        return self._get_bytes(bucket, f"{prefix}/{MANIFEST}", uri, limit=MAX_MANIFEST_BYTES)

    def read_manifest(self, ref: ManifestRef | str) -> AdapterManifest:
        uri = ref.uri if isinstance(ref, ManifestRef) else ref
        body = self.manifest_bytes(uri)
        if isinstance(ref, ManifestRef) and hashlib.sha256(body).hexdigest() != ref.manifest_sha256:
            raise IntegrityError(f"manifest of {uri} does not match the digest in the event")
        return parse_manifest(body, uri)

    def read_checked_manifest(self, ref: ManifestRef | str) -> AdapterManifest:
        """The manifest, once every file it lists is found in the store at the size it says,
        without downloading them (the sha256 of each is checked where it is downloaded). What
        the registry checks before it makes an adapter active: a manifest alone read back intact
        while its weights were gone, and the active version then failed every load."""
        manifest = self.read_manifest(ref)
        uri = ref.uri if isinstance(ref, ManifestRef) else ref
        bucket, prefix = self.locate(uri)
        if len(manifest.files) > MAX_ADAPTER_FILES:
            raise IntegrityError(f"manifest of {uri} lists {len(manifest.files)} files, more than {MAX_ADAPTER_FILES}")
        for name in manifest.files:
            size = self._size(bucket, f"{prefix}/{name}", uri)
            if name in manifest.sizes and size != manifest.sizes[name]:
                raise IntegrityError(f"{uri}/{name} holds {size} bytes, where its manifest says {manifest.sizes[name]}")
        return manifest

    def get_adapter(self, ref: ManifestRef | str, dest: Path, max_bytes: int | None = None) -> AdapterManifest:
        """Download an adapter into ``dest`` and check every file's sha256.

        On any mismatch nothing is left in ``dest`` and IntegrityError is raised. ``max_bytes``:
        the most its files may hold together, checked before anything is downloaded (an adapter
        of a base is far smaller than the base; a larger one would only fill the disk).
        """
        manifest = self.read_manifest(ref)
        uri = ref.uri if isinstance(ref, ManifestRef) else ref
        bucket, prefix = self.locate(uri)
        if len(manifest.files) > MAX_ADAPTER_FILES:
            raise IntegrityError(f"manifest of {uri} lists {len(manifest.files)} files, more than {MAX_ADAPTER_FILES}")
        if max_bytes is not None:
            total = sum(self._size(bucket, f"{prefix}/{name}", uri) for name in manifest.files)
            if total > max_bytes:
                raise IntegrityError(f"{uri} holds {total} bytes, more than the {max_bytes} an adapter of this base can need")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".seal-dl-", dir=dest.parent))
        try:
            for name, expected in manifest.files.items():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise IntegrityError(f"manifest of {uri} names an unsafe path {name!r}")
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.client.fget_object(bucket, f"{prefix}/{name}", str(target))
                except S3Error as exc:
                    if exc.code == "NoSuchKey":
                        raise IntegrityError(f"{uri}/{name} is listed in the manifest but missing") from exc
                    raise
                actual = sha256_file(target)
                if actual != expected:
                    raise IntegrityError(
                        f"{uri}/{name}: sha256 {actual[:12]}... does not match manifest {expected[:12]}..."
                    )
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
            return manifest
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _size(self, bucket: str, key: str, uri: str) -> int:
        try:
            return int(self.client.stat_object(bucket, key).size)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise IntegrityError(f"{uri}/{key.rsplit('/', 1)[-1]} is listed in the manifest but missing") from exc
            raise

    def _get_bytes(self, bucket: str, key: str, uri: str, limit: int | None = None) -> bytes:
        try:
            response = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise AdapterNotFound(f"no adapter at {uri}") from exc
            raise
        try:
            if limit is None:
                return response.read()
            body = response.read(limit + 1)
            if len(body) > limit:
                raise IntegrityError(f"{key.rsplit('/', 1)[-1]} of {uri} is larger than {limit} bytes")
            return body
        finally:
            response.close()
            response.release_conn()
