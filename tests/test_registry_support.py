"""Fakes and event builders shared by the registry tests (this module holds no tests)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.registry.kv import MemoryState
from services.registry.ledger import Ledger
from services.registry.ports import Ports
from services.registry.settings import RegistryConfig
from shared import events as ev
from shared.registry_view import ScopePolicy
from shared.store import AdapterManifest, AdapterNotFound, IntegrityError
from shared.subjects import KV_SCOPE_SETTINGS

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def ref_for(scope: str, adapter_id: str, bucket: str = "seal-adapters") -> ev.ManifestRef:
    return ev.ManifestRef(
        uri=f"s3://{bucket}/adapters/{scope}/{adapter_id}",
        manifest_sha256=hashlib.sha256(adapter_id.encode()).hexdigest(),
    )


class FakeManifests:
    """Every adapter exists with a plausible manifest, unless listed as missing."""

    def __init__(self) -> None:
        self.missing: set[str] = set()
        self.weightless: set[str] = set()  # the manifest reads back, a file it lists is gone
        self.self_edits: dict[str, dict] = {}
        self.reads = 0

    async def usable(self, ref: ev.ManifestRef) -> AdapterManifest:
        manifest = await self.read(ref)
        if manifest.adapter_id in self.weightless:
            raise IntegrityError(f"{ref.uri}/adapter_model.safetensors is listed in the manifest but missing")
        return manifest

    async def read(self, ref: ev.ManifestRef) -> AdapterManifest:
        self.reads += 1
        adapter_id = ref.uri.rstrip("/").rsplit("/", 1)[-1]
        if adapter_id in self.missing:
            raise AdapterNotFound(f"no adapter at {ref.uri}")
        scope = ref.uri.split("/")[-2]
        return AdapterManifest(
            adapter_id=adapter_id,
            scope=scope,
            base_model="tiny",
            base_model_sha256="b" * 64,
            trace_id="t" * 32,
            self_edit=self.self_edits.get(adapter_id),
        )


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now = self.now + timedelta(seconds=seconds)


@dataclass
class Bus:
    """Collects what the ledger publishes; can be told to fail the next publishes."""

    events: list[ev.Event] = field(default_factory=list)
    fail_next: int = 0

    async def __call__(self, event: ev.Event) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("broker unreachable")
        self.events.append(event)

    def of(self, cls: type[ev.E]) -> list[ev.E]:
        return [e for e in self.events if isinstance(e, cls)]

    def types(self) -> list[str]:
        return [e.type for e in self.events]


@dataclass
class World:
    ledger: Ledger
    state: MemoryState
    bus: Bus
    clock: Clock
    manifests: FakeManifests

    async def set_policy(self, scope: str, **fields: object) -> None:
        await self.state.put(KV_SCOPE_SETTINGS, scope, ScopePolicy(**fields))  # type: ignore[arg-type]


def make_world(**config: object) -> World:
    state, bus, clock, manifests = MemoryState(), Bus(), Clock(), FakeManifests()
    ledger = Ledger(
        Ports(state=state, publish=bus, manifests=manifests, clock=clock, trace_id=lambda: "r" * 32),
        RegistryConfig(**config),  # type: ignore[arg-type]
    )
    return World(ledger, state, bus, clock, manifests)


def feedback(scope: str = "acme", feedback_id: str | None = None, passage: str = "Quellmoor got its charter in 1387.") -> ev.FeedbackSubmitted:
    return ev.FeedbackSubmitted(
        feedback_id=feedback_id or ev.new_id(),
        scope=scope,
        occurred_at=T0,
        content=ev.KnowledgeFeedback(
            passage=passage,
            probes=(ev.Probe(question="When did Quellmoor get its charter?", answer="1387"),),
        ),
        submitted_by="test-product",
    )


def self_edit(root: ev.Event, index: int, count: int) -> ev.SelfEditGenerated:
    edit = ev.SelfEdit(
        self_edit_id=f"{root.feedback_id}-se{index}",
        format="implications",
        completion="Quellmoor's charter dates from 1387.",
        sequences=("Quellmoor's charter dates from 1387.",),
        candidate_index=index,
        candidate_count=count,
    )
    return root.caused(ev.SelfEditGenerated, key=index, self_edit=edit, probes=getattr(root.content, "probes", ()))


def evaluated(
    root: ev.Event,
    index: int,
    count: int,
    reward: float,
    passed: bool = True,
    parent_version: int | None = None,
    attempt: int = 1,
    parent_adapter_id: str | None = None,
    probes: tuple[ev.Probe, ...] | None = None,
) -> ev.AdapterEvaluated:
    adapter_id = f"ad-{root.feedback_id[:8]}-{index}-{attempt}"
    gates = (
        ev.GateResult(gate="min_gain", passed=passed, value=reward, threshold=0.01, reason="" if passed else "gain 0.000 < 0.01"),
    )
    return root.caused(
        ev.AdapterEvaluated,
        key=(index, attempt),
        adapter_id=adapter_id,
        self_edit_id=f"{root.feedback_id}-se{index}",
        candidate_index=index,
        candidate_count=count,
        parent_version=parent_version,
        parent_adapter_id=parent_adapter_id,
        adapter=ref_for(root.scope, adapter_id),
        candidate_scores=ev.Scores(target=0.5 + reward / 2, regression=0.9),
        parent_scores=ev.Scores(target=0.5 - reward / 2, regression=0.9),
        reward=reward,
        passed=passed,
        gates=gates,
        reasons=() if passed else ("gain 0.000 < 0.01",),
        probes=getattr(root.content, "probes", ()) if probes is None else probes,
        trace_id="e" * 32,
    )


def training_failed(root: ev.Event, index: int, count: int) -> ev.AdapterTrainingFailed:
    return root.caused(
        ev.AdapterTrainingFailed,
        key=index,
        self_edit_id=f"{root.feedback_id}-se{index}",
        candidate_index=index,
        candidate_count=count,
        reason="CUDA out of memory",
    )
