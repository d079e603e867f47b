"""The scope head's outbox: the events of an operator's rollback or pin, written in the same
compare-and-set as the change to the active version, published after it and then removed, so the
audit of who changed the active version, and why, is not lost to a failed publish or a restart.

An action marks its request (``headout.<scope>.<request>``) before it moves the head and removes the
marker once its events are out. What a crash or a failed publish left goes out with the scope's next
rollback, pin or promotion, or with the sweep, which flushes the outbox of a marker older than
:data:`GRACE` (a younger one's action may still be under way).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from shared import events as ev
from shared.subjects import KV_REGISTRY

from .records import Marker, ScopeHead, head_key

if TYPE_CHECKING:
    from .ledger import Ledger

log = logging.getLogger(__name__)

# How long an operator's action may take between its marker and removing it.
GRACE = timedelta(minutes=5)


async def flush(ledger: Ledger, scope: str) -> ScopeHead | None:
    """Publish the events of the scope head's outbox, then remove those from it; the head after."""
    head = await ledger.head(scope)
    if head is None or not head.outbox:
        return head
    sent = set()
    for item in head.outbox:
        await ledger.ports.publish(ev.parse_event(item))  # deterministic ids: a re-publish is dropped
        sent.add(item["event_id"])

    def published(current: ScopeHead | None) -> ScopeHead | None:
        if current is None or not current.outbox:
            return None
        left = tuple(item for item in current.outbox if item["event_id"] not in sent)
        return None if left == current.outbox else current.model_copy(update={"outbox": left})

    return await ledger.ports.state.compare_and_set(KV_REGISTRY, head_key(scope), ScopeHead, published)


async def sweep(ledger: Ledger, now: datetime) -> None:
    """Flush the head outboxes that crashed or failed actions left (markers older than GRACE)."""
    markers = await ledger.ports.state.entries(KV_REGISTRY, "headout.*.*", Marker, skip_unreadable=True)
    for key, marker in markers.items():
        if marker.at is not None and now - marker.at < GRACE:
            continue  # its action may still be under way: it removes the marker itself
        try:
            head = await ledger.flush_head(key.split(".")[1])
            if head is None or not head.outbox:
                await ledger.ports.state.delete(KV_REGISTRY, key)
        except Exception:  # noqa: BLE001 - one scope must not stop the sweep
            log.exception("sweep could not publish the head outbox of %s", key)
