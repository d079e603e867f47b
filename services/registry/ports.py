"""The ledger's ports (state, bus, adapter manifests, clock) and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shared import events as ev
from shared.store import AdapterManifest
from shared.telemetry import current_trace_id

from .kv import State


class Manifests(Protocol):
    async def read(self, ref: ev.ManifestRef) -> AdapterManifest: ...

    async def usable(self, ref: ev.ManifestRef) -> AdapterManifest: ...


class StoreManifests:
    """Manifests read from the adapter store (blocking client, run in a thread)."""

    def __init__(self, store: Any):
        self.store = store

    async def read(self, ref: ev.ManifestRef) -> AdapterManifest:
        return await asyncio.to_thread(self.store.read_manifest, ref)

    async def usable(self, ref: ev.ManifestRef) -> AdapterManifest:
        """The manifest, once every file it lists is in the store at its size (before a version goes live)."""
        return await asyncio.to_thread(self.store.read_checked_manifest, ref)


class NotFound(LookupError):
    pass


class Refused(Exception):
    """An operator action that does not apply to the current state (HTTP 409)."""


class Busy(Exception):
    """Too many questions waiting for the one model: answered 503, to be asked again."""


class InvalidRequest(ValueError):
    """A request whose arguments cannot be right, whatever the state (HTTP 422)."""


@dataclass
class Ports:
    state: State
    publish: Callable[[ev.Event], Awaitable[None]]
    manifests: Manifests
    clock: Callable[[], datetime] = ev.utcnow
    trace_id: Callable[[], str | None] = current_trace_id
