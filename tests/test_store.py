"""The adapter store against the real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from shared.events import ManifestRef
from shared.store import AdapterManifest, AdapterNotFound, AdapterStore, IntegrityError, ManifestTooLarge, parse_uri

pytestmark = pytest.mark.servers


def make_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return folder


def manifest(adapter_id: str) -> AdapterManifest:
    return AdapterManifest(adapter_id=adapter_id, scope="acme", base_model="tiny", feedback_ids=("fb1",), self_edit_id="se1")


def test_round_trip_keeps_bytes_and_manifest(adapter_store: AdapterStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src")
    ref = adapter_store.put_adapter(src, manifest("round-trip"))
    assert adapter_store.exists(ref.uri)
    got = adapter_store.get_adapter(ref, tmp_path / "dst")
    assert set(got.files) == {"adapter_config.json", "adapter_model.safetensors"}
    for name in got.files:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert got.feedback_ids == ("fb1",) and got.self_edit_id == "se1"


def test_tampered_file_is_refused(adapter_store: AdapterStore, tmp_path: Path) -> None:
    ref = adapter_store.put_adapter(make_adapter(tmp_path / "src"), manifest("tampered"))
    bucket, prefix = parse_uri(ref.uri)
    evil = b"\x00" * 100
    adapter_store.client.put_object(bucket, f"{prefix}/adapter_model.safetensors", io.BytesIO(evil), len(evil))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors: sha256"):
        adapter_store.get_adapter(ref, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    # checked without downloading: the size the manifest gives
    with pytest.raises(IntegrityError, match="holds 100 bytes, where its manifest says 16384"):
        adapter_store.read_checked_manifest(ref)
    assert adapter_store.read_checked_manifest(adapter_store.put_adapter(make_adapter(tmp_path / "ok"), manifest("whole"))).sizes[
        "adapter_model.safetensors"] == 16384


def test_tampered_manifest_is_refused(adapter_store: AdapterStore, tmp_path: Path) -> None:
    ref = adapter_store.put_adapter(make_adapter(tmp_path / "src"), manifest("manifest-swap"))
    forged = ManifestRef(uri=ref.uri, manifest_sha256="0" * 64)
    with pytest.raises(IntegrityError, match="does not match the digest"):
        adapter_store.get_adapter(forged, tmp_path / "dst")


def test_missing_file_and_missing_adapter(adapter_store: AdapterStore, tmp_path: Path) -> None:
    ref = adapter_store.put_adapter(make_adapter(tmp_path / "src"), manifest("half-gone"))
    bucket, prefix = parse_uri(ref.uri)
    adapter_store.client.remove_object(bucket, f"{prefix}/adapter_config.json")
    with pytest.raises(IntegrityError, match="missing"):
        adapter_store.get_adapter(ref, tmp_path / "dst")
    assert adapter_store.read_manifest(ref).adapter_id == "half-gone"  # the manifest alone reads back
    with pytest.raises(IntegrityError, match="adapter_config.json is listed in the manifest but missing"):
        adapter_store.read_checked_manifest(ref)
    assert not adapter_store.exists(f"s3://{bucket}/adapters/acme/never-written")
    with pytest.raises(AdapterNotFound):
        adapter_store.read_manifest(f"s3://{bucket}/adapters/acme/never-written")


def test_a_manifest_is_stored_as_utf_8_and_one_too_large_to_read_back_is_refused(adapter_store: AdapterStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src")
    ref = adapter_store.put_adapter(src, manifest("utf8").model_copy(update={"training": {"note": "漢字"}}))
    body = adapter_store.manifest_bytes(ref.uri)
    assert "漢字".encode() in body and b"\\u" not in body  # 3 bytes a character, not 6
    assert adapter_store.read_manifest(ref).training["note"] == "漢字"
    huge = manifest("huge").model_copy(update={"training": {"lineage": ["x" * (17 << 20)]}})
    with pytest.raises(ManifestTooLarge, match="more than a manifest may be read back"):
        adapter_store.put_adapter(src, huge)
    bucket, prefix = parse_uri(adapter_store.uri_for("acme", "huge"))
    assert list(adapter_store.client.list_objects(bucket, prefix=f"{prefix}/", recursive=True)) == []  # nothing half-stored


def test_an_s3_server_that_never_answers_fails_a_call_in_the_settings_time(tmp_path: Path) -> None:
    """minio's own client waits 5 minutes a try, 6 tries: a service's thread was held for half an
    hour by an S3 server that accepts connections and never answers."""
    import socket
    import threading
    import time

    from shared.settings import StoreSettings

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepted by the kernel, never read nor answered
    store = AdapterStore.from_settings(StoreSettings(endpoint=f"127.0.0.1:{silent.getsockname()[1]}",
                                                     read_timeout_s=0.5, retries=1))
    outcome: list[object] = []

    def call() -> None:
        started = time.monotonic()
        try:
            store.read_manifest("s3://seal-adapters/acme/adapters/a1")
            outcome.append("answered")
        except Exception as exc:  # noqa: BLE001 - what it fails with is checked below
            outcome.append((type(exc).__name__, time.monotonic() - started))

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(30)
    silent.close()
    assert outcome, "still waiting for the S3 server after 30 s"
    [(_, seconds)] = outcome
    assert seconds < 10  # two tries of 0.5 s, and the backoff between them
