"""The generator's view of shared state in JetStream KV.

* :class:`KvScopeState`: the scope's policy (k, format, blocklist, default
  directives) and its policy adapter, as the registry wrote them.
* :class:`KvLedger`: which feedback this service has handled, in the
  ``seal_processed`` bucket under ``generator.<feedback id>``. Before
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
from nats.js.errors import KeyNotFoundError

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
    status: Literal["pending", "done"]
    event_ids: tuple[str, ...] = ()
    events: tuple[Event, ...] = field(default=(), compare=False)

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
        return cls(body["status"], tuple(body.get("event_ids", [])), events)


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
