"""The registry's state port: typed reads and compare-and-set writes over a KV store.

:class:`NatsState` is JetStream KV (writes go through
:func:`shared.registry_view.compare_and_set`); :class:`MemoryState` keeps
the same semantics (revisions, conflicts on a stale write) in a dict, for
tests and for running the registry without a server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from pydantic import BaseModel

from shared.registry_view import ConflictError, compare_and_set, parse_record, parsed_or_none, read_model

M = TypeVar("M", bound=BaseModel)
Change = Callable[[M | None], M | None]


class State(Protocol):
    async def read(self, bucket: str, key: str, model: type[M]) -> M | None: ...

    async def compare_and_set(
        self, bucket: str, key: str, model: type[M], change: Change, *, unreadable_as_absent: bool = False
    ) -> M | None:
        """Apply ``change`` to the current value and write it unless someone wrote first
        (then read again and retry). ``change`` returning None leaves the value as is;
        the value in place afterwards is returned. A value that does not parse raises
        ``UnreadableRecord``; with ``unreadable_as_absent`` ``change`` sees None (a repair)."""
        ...

    async def put(self, bucket: str, key: str, value: BaseModel) -> None: ...

    async def delete(self, bucket: str, key: str) -> None: ...

    async def keys(self, bucket: str, pattern: str) -> list[str]:
        """Every live key matching a NATS subject pattern, without reading the values."""
        ...

    async def entries(self, bucket: str, pattern: str, model: type[M], *, skip_unreadable: bool = False) -> dict[str, M]:
        """Every live key matching a NATS subject pattern (``*`` one token, ``>`` the rest).

        A value that does not parse raises ``UnreadableRecord``, as :meth:`read` does; with
        ``skip_unreadable`` (listings, the sweep) it is left out, with the reason in the log."""
        ...


class NatsState:
    def __init__(self, js: JetStreamContext):
        self.js = js

    async def read(self, bucket: str, key: str, model: type[M]) -> M | None:
        return (await read_model(self.js, bucket, key, model))[0]

    async def compare_and_set(
        self, bucket: str, key: str, model: type[M], change: Change, *, unreadable_as_absent: bool = False
    ) -> M | None:
        return await compare_and_set(self.js, bucket, key, model, change, unreadable_as_absent=unreadable_as_absent)

    async def put(self, bucket: str, key: str, value: BaseModel) -> None:
        kv = await self.js.key_value(bucket)
        await kv.put(key, value.model_dump_json().encode())

    async def delete(self, bucket: str, key: str) -> None:
        kv = await self.js.key_value(bucket)
        try:
            await kv.delete(key)
        except KeyNotFoundError:
            pass

    async def keys(self, bucket: str, pattern: str) -> list[str]:
        # The server filters by the pattern and sends each key's latest headers only (nats-py's
        # own ``keys`` watches the whole bucket and filters on this side).
        kv = await self.js.key_value(bucket)
        watcher = await kv.watch(pattern, ignore_deletes=True, meta_only=True)
        found: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.operation not in ("DEL", "PURGE"):
                    found.append(entry.key)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        return found

    async def entries(self, bucket: str, pattern: str, model: type[M], *, skip_unreadable: bool = False) -> dict[str, M]:
        kv = await self.js.key_value(bucket)
        watcher = await kv.watch(pattern, ignore_deletes=True)
        found: dict[str, M] = {}
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    found.pop(entry.key, None)
                    continue
                parsed = parsed_or_none(model, bucket, entry.key, entry.value, skip_unreadable)
                if parsed is not None:
                    found[entry.key] = parsed
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        return found


class MemoryState:
    """In-memory KV with revisions. ``before_write`` lets a test slip a
    concurrent writer in between a read and the write that depends on it."""

    def __init__(self, attempts: int = 10) -> None:
        self.data: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.revision = 0
        self.attempts = attempts
        self.conflicts = 0
        self.before_write: Callable[[str, str], Awaitable[None]] | None = None

    def _get(self, bucket: str, key: str) -> tuple[bytes | None, int]:
        body, rev = self.data.get((bucket, key), (None, 0))
        return body, rev

    def _write(self, bucket: str, key: str, body: bytes) -> None:
        self.revision += 1
        self.data[(bucket, key)] = (body, self.revision)

    async def read(self, bucket: str, key: str, model: type[M]) -> M | None:
        body, _ = self._get(bucket, key)
        return None if body is None else parse_record(model, bucket, key, body)

    async def compare_and_set(
        self, bucket: str, key: str, model: type[M], change: Change, *, unreadable_as_absent: bool = False
    ) -> M | None:
        for _ in range(self.attempts):
            body, revision = self._get(bucket, key)
            current = None if body is None else parsed_or_none(model, bucket, key, body, unreadable_as_absent)
            updated = change(current)
            if updated is None:
                return current
            if self.before_write is not None:
                await self.before_write(bucket, key)
            if self._get(bucket, key)[1] != revision:
                self.conflicts += 1
                continue
            self._write(bucket, key, updated.model_dump_json().encode())
            return updated
        raise ConflictError(f"{bucket}/{key}: gave up after {self.attempts} conflicting writes")

    async def put(self, bucket: str, key: str, value: BaseModel) -> None:
        self._write(bucket, key, value.model_dump_json().encode())

    async def delete(self, bucket: str, key: str) -> None:
        self.data.pop((bucket, key), None)

    async def keys(self, bucket: str, pattern: str) -> list[str]:
        return [key for (b, key) in sorted(self.data) if b == bucket and subject_matches(pattern, key)]

    async def entries(self, bucket: str, pattern: str, model: type[M], *, skip_unreadable: bool = False) -> dict[str, M]:
        found = {
            key: parsed_or_none(model, bucket, key, body, skip_unreadable)
            for (b, key), (body, _) in sorted(self.data.items())
            if b == bucket and subject_matches(pattern, key)
        }
        return {key: value for key, value in found.items() if value is not None}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
