"""Fixtures shared by every test.

``stack`` starts the same real servers as ``seal up`` (nats-server with
JetStream and SeaweedFS's S3 gateway) on free ports, once per test session,
with streams, KV buckets and the bucket created. ``tiny_model`` and
``tiny_model_path`` give the random-weight test model; ``default_model`` the
real SmolLM2 (marked slow by the tests that use it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from seal.stack import LocalStack, StackPorts
from shared.broker import ensure_streams_at
from shared.models import LoadedModel, load_model, model_path
from shared.settings import ModelSettings, ServiceSettings
from shared.store import AdapterStore

# Model caches survive between test runs (and are shared with `seal up`).
MODEL_CACHE = Path(os.environ.get("SEAL_TEST_MODEL_CACHE", "~/.cache/seal/models")).expanduser()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = LocalStack(tmp_path_factory.mktemp("stack"), StackPorts.free())
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
async def provisioned_stack(stack: LocalStack) -> AsyncIterator[LocalStack]:
    await ensure_streams_at(stack.nats_settings())
    AdapterStore.from_settings(stack.store_settings()).ensure_bucket()
    yield stack


@pytest.fixture(scope="session")
def adapter_store(stack: LocalStack) -> AdapterStore:
    store = AdapterStore.from_settings(stack.store_settings())
    store.ensure_bucket()
    return store


@pytest.fixture
def service_settings(provisioned_stack: LocalStack, tmp_path: Path) -> ServiceSettings:
    """Settings pointing at the test stack with the tiny model."""
    return ServiceSettings(
        nats=provisioned_stack.nats_settings(),
        store=provisioned_stack.store_settings(),
        model=ModelSettings(name="tiny", cache_dir=MODEL_CACHE),
        _secrets_dir=str(tmp_path / "no-secrets"),
    )


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    path = model_path("tiny", MODEL_CACHE)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path: Path) -> LoadedModel:
    return load_model(ModelSettings(name="tiny", cache_dir=MODEL_CACHE, device="cpu"))


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load_model(ModelSettings(name="default", cache_dir=MODEL_CACHE, device="cpu"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (evaluation data; not part of the repo)."""
    if not SHARED_DATA.exists():
        pytest.skip(f"evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA
