"""The generator's view of shared state in JetStream KV.

* :class:`KvScopeState`: the scope's policy (k, format, blocklist, default
  directives) and its policy adapter, as the registry wrote them.
* :class:`KvLedger`: which feedback this service has handled, in the
  ``seal_processed`` bucket under ``generator.<feedback id>``. Before writing,
  a delivery claims the feedback (*writing*, compare-and-set), so that a
  second delivery under another event id, on another replica, waits for it
  rather than writing a second set of candidates. Before
  publishing, the events are recorded as *pending*; after, the record
  becomes *done*. A redelivery of a done feedback produces nothing; one that
  finds a pending record republishes the recorded events (same ids, so the
  stream drops the copies) instead of sampling again. The bucket forgets a
  key at least 10 days after the events stream forgets the message it was noted for
  (``shared.subjects.KV_MAX_AGE``).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from shared.events import Event, parse_event
from shared.registry_view import PolicyAdapterRef, ScopePolicy, read_policy_adapter, read_scope_policy
from shared.subjects import KV_IDEMPOTENCY

LEDGER_PREFIX = "generator"
# Pending records carry the events; beyond this size only the ids are kept
# (a retry then samples again, deterministically seeded).
MAX_PENDING_BYTES = 512 * 1024


class KvScopeState:
    """The registry's records for a scope; one that does not parse raises
    ``shared.registry_view.UnreadableRecord`` (retried, then dead-lettered with the reason)."""

    def __init__(self, js: JetStreamContext):
        self.js = js

    async def scope_policy(self, scope: str) -> ScopePolicy:
        return await read_scope_policy(self.js, scope)

    async def policy_adapter(self, scope: str) -> PolicyAdapterRef | None:
        return await read_policy_adapter(self.js, scope)


@dataclass(frozen=True)
class LedgerEntry:
    """*writing*: claimed by the delivery of ``writer`` (an event id) at ``at``; *pending*: written,
    its events maybe not all published; *done*: published."""

    status: Literal["writing", "pending", "done"]
    event_ids: tuple[str, ...] = ()
    events: tuple[Event, ...] = field(default=(), compare=False)
    writer: str | None = None
    at: datetime | None = field(default=None, compare=False)

    @classmethod
    def writing(cls, event_id: str) -> "LedgerEntry":
        return cls("writing", writer=event_id, at=datetime.now(UTC))

    @classmethod
    def pending(cls, events: list[Event] | tuple[Event, ...]) -> "LedgerEntry":
        return cls("pending", tuple(e.event_id for e in events), tuple(events))

    @classmethod
    def done(cls, events: list[Event] | tuple[Event, ...]) -> "LedgerEntry":
        return cls("done", tuple(e.event_id for e in events))

    def encode(self) -> bytes:
        body = {
            "status": self.status,
            "event_ids": list(self.event_ids),
            "events": [e.model_dump(mode="json") for e in self.events],
            "writer": self.writer,
            "at": datetime.now(UTC).isoformat(),
        }
        packed = zlib.compress(json.dumps(body).encode())
        if len(packed) > MAX_PENDING_BYTES:
            body["events"] = []
            packed = zlib.compress(json.dumps(body).encode())
        return packed

    @classmethod
    def decode(cls, raw: bytes) -> "LedgerEntry":
        body = json.loads(zlib.decompress(raw))
        events = tuple(parse_event(e) for e in body.get("events", []))
        at = datetime.fromisoformat(body["at"]) if body.get("at") else None
        return cls(body["status"], tuple(body.get("event_ids", [])), events, body.get("writer"), at)

    def stale(self, after_s: float) -> bool:
        """A claim older than ``after_s`` seconds: its writer is taken to have died."""
        return self.at is None or (datetime.now(UTC) - self.at).total_seconds() > after_s


def ledger_key(scope: str, feedback_id: str) -> str:
    """A KV key for a scope's feedback id (ids may hold ':', which keys may not).

    Products choose their own feedback ids, so two scopes may both send "fb-1": the scope is part
    of the key, as it is of the registry's records."""
    token = feedback_id if re.fullmatch(r"[A-Za-z0-9_-]+", feedback_id) else f"h{hashlib.sha256(feedback_id.encode()).hexdigest()[:40]}"
    return f"{LEDGER_PREFIX}.{scope}.{token}"


class KvLedger:
    def __init__(self, js: JetStreamContext, bucket: str = KV_IDEMPOTENCY):
        self.js = js
        self.bucket = bucket

    async def recall(self, scope: str, feedback_id: str) -> LedgerEntry | None:
        kv = await self.js.key_value(self.bucket)
        try:
            entry = await kv.get(ledger_key(scope, feedback_id))
        except KeyNotFoundError:
            return None
        if not entry.value or entry.operation in ("DEL", "PURGE"):
            return None
        return LedgerEntry.decode(entry.value)

    async def record(self, scope: str, feedback_id: str, entry: LedgerEntry) -> None:
        kv = await self.js.key_value(self.bucket)
        await kv.put(ledger_key(scope, feedback_id), entry.encode())

    async def claim(self, scope: str, feedback_id: str, event_id: str, stale_after_s: float) -> LedgerEntry | None:
        """Claim the writing for the delivery of ``event_id``: None when it is this delivery's to
        write (no entry, its own earlier claim, or a stale one); else the entry in the way (another
        delivery's claim, or what it wrote). Compare-and-set: of two claimants, one wins."""
        kv = await self.js.key_value(self.bucket)
        key, claim = ledger_key(scope, feedback_id), LedgerEntry.writing(event_id).encode()
        try:
            await kv.create(key, claim)
            return None
        except KeyWrongLastSequenceError:
            pass
        try:
            current = await kv.get(key)
        except KeyNotFoundError:  # gone again (the bucket's TTL): whoever creates it next wins
            return await self.claim(scope, feedback_id, event_id, stale_after_s)
        entry = LedgerEntry.decode(current.value)
        if entry.status != "writing" or (entry.writer != event_id and not entry.stale(stale_after_s)):
            return entry
        try:
            await kv.update(key, claim, last=current.revision)
            return None
        except KeyWrongLastSequenceError:  # another claimant took it first
            return await self.recall(scope, feedback_id) or entry

    async def record_written(self, scope: str, feedback_id: str, writer: str, entry: LedgerEntry) -> bool:
        """Record what ``writer`` wrote, only while the claim is still its own (compare-and-set on
        the claim's revision): False when another delivery took the claim over meanwhile (this
        one's renewals failed, so its claim went stale), whose writing then stands alone."""
        kv = await self.js.key_value(self.bucket)
        key = ledger_key(scope, feedback_id)
        try:
            current = await kv.get(key)
        except KeyNotFoundError:
            return False
        held = LedgerEntry.decode(current.value) if current.value else None
        if held is None or held.status != "writing" or held.writer != writer:
            return False
        try:
            await kv.update(key, entry.encode(), last=current.revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def release(self, scope: str, feedback_id: str, event_id: str) -> None:
        """Give up this delivery's claim (its writing failed): a delivery waiting for it goes on at
        once, instead of when the claim goes stale. Nothing if the claim is no longer its own."""
        kv = await self.js.key_value(self.bucket)
        key = ledger_key(scope, feedback_id)
        try:
            current = await kv.get(key)
            entry = LedgerEntry.decode(current.value)
            if entry.status == "writing" and entry.writer == event_id:
                await kv.delete(key, last=current.revision)
        except (KeyNotFoundError, KeyWrongLastSequenceError):
            pass
