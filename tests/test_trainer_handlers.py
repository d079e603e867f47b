"""Trainer handlers with fakes at the boundary (object store, registry, ledger) and the tiny model."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from services.trainer import handlers
from services.trainer.handlers import TrainerPorts
from services.trainer.lora_training import LoraTrainer
from services.trainer.ports import ParentCache, claim_lost, claim_stale, claim_value
from shared import events as ev
from shared.dead_letters import PermanentFailure
from shared.registry_view import ActiveAdapter, PolicyAdapterRef
from shared.store import MANIFEST, AdapterManifest, AdapterNotFound, IntegrityError, adapter_prefix, sha256_file

SEQUENCES = (
    "the town of green river was founded in one thousand",
    "the duke built a market in the city of red",
    "what is the capital of the country? the capital is blue town",
)
DIRECTIVES = ev.TrainingDirectives(learning_rate=1e-3, epochs=3, lora_rank=4, lora_alpha=8, batch_size=4)


class FakeStore:
    """Object storage in a dict of {uri: {file name: bytes}}, checked like the real one."""

    bucket = "fake-bucket"

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, bytes]] = {}
        self.puts = 0

    def uri_for(self, scope: str, adapter_id: str) -> str:
        return f"s3://{self.bucket}/{adapter_prefix(scope, adapter_id)}"

    def exists(self, uri: str) -> bool:
        return MANIFEST in self.objects.get(uri, {})

    def stored(self, uri: str) -> tuple[ev.ManifestRef, AdapterManifest]:
        body = self.objects[uri][MANIFEST]
        return ev.ManifestRef(uri=uri, manifest_sha256=hashlib.sha256(body).hexdigest()), AdapterManifest.model_validate_json(body)

    def put_adapter(self, local_dir: Path, manifest: AdapterManifest) -> ev.ManifestRef:
        self.puts += 1
        uri = self.uri_for(manifest.scope, manifest.adapter_id)
        files = {p.name: p.read_bytes() for p in Path(local_dir).iterdir()}
        sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        body = json.dumps(manifest.model_copy(update={"files": sums}).model_dump(mode="json")).encode()
        self.objects[uri] = {**files, MANIFEST: body}
        return ev.ManifestRef(uri=uri, manifest_sha256=hashlib.sha256(body).hexdigest())

    def get_adapter(self, ref: ev.ManifestRef | str, dest: Path) -> AdapterManifest:
        uri = ref.uri if isinstance(ref, ev.ManifestRef) else ref
        if uri not in self.objects:
            raise AdapterNotFound(uri)
        ref_obj, manifest = self.stored(uri)
        if isinstance(ref, ev.ManifestRef) and ref.manifest_sha256 != ref_obj.manifest_sha256:
            raise IntegrityError(f"manifest of {uri} does not match")
        dest.mkdir(parents=True, exist_ok=True)
        for name, expected in manifest.files.items():
            (dest / name).write_bytes(self.objects[uri][name])
            if sha256_file(dest / name) != expected:
                shutil.rmtree(dest)
                raise IntegrityError(f"{uri}/{name} does not match its manifest")
        (dest / MANIFEST).write_text(manifest.model_dump_json())
        return manifest

    def prefixes(self, scope: str) -> list[str]:
        return sorted(uri for uri in self.objects if f"/adapters/{scope}/" in uri)


class FakeRegistry:
    def __init__(self) -> None:
        self.active_adapters: dict[str, ActiveAdapter] = {}
        self.policies: dict[str, PolicyAdapterRef] = {}

    async def active(self, scope: str) -> ActiveAdapter | None:
        return self.active_adapters.get(scope)

    async def policy(self, scope: str) -> PolicyAdapterRef | None:
        return self.policies.get(scope)


class FakeLedger:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def pin(self, key: str, value: bytes) -> bytes:
        return self.values.setdefault(key, value)

    async def claim(self, key: str, owner: str, stale_s: float) -> bool:
        held = self.values.setdefault(key, claim_value(owner))
        if not claim_lost(held, owner):
            return True
        if claim_stale(held, stale_s):
            self.values[key] = claim_value(owner)
            return True
        return False

    async def release(self, key: str, owner: str) -> None:
        if not claim_lost(self.values.get(key), owner):
            del self.values[key]


class CountingTrainer(LoraTrainer):
    jobs = 0
    last_job = None

    def train(self, job):  # type: ignore[no-untyped-def]
        self.jobs += 1
        self.last_job = job
        return super().train(job)


@pytest.fixture
def ports(tiny_model, tmp_path: Path) -> TrainerPorts:
    return make_ports(tiny_model, tmp_path)


def make_ports(tiny_model, tmp_path: Path) -> TrainerPorts:  # noqa: ANN001
    store = FakeStore()
    return TrainerPorts(
        trainer=CountingTrainer(tiny_model, tmp_path / "work"),
        store=store,
        registry=FakeRegistry(),
        ledger=FakeLedger(),
        parents=ParentCache(store, tmp_path / "parents"),
    )


def self_edit_event(scope: str = "acme", directives: ev.TrainingDirectives = DIRECTIVES, **edit: object) -> ev.SelfEditGenerated:
    fields = {"self_edit_id": ev.new_id(), "format": "implications", "completion": "\n".join(SEQUENCES),
              "sequences": SEQUENCES, "directives": directives, "candidate_index": 1, "candidate_count": 3, **edit}
    probe = ev.Probe(question="What was founded?", answer="green river")
    return ev.SelfEditGenerated(feedback_id=ev.new_id(), scope=scope, self_edit=ev.SelfEdit(**fields), probes=(probe,))


def activate(ports: TrainerPorts, scope: str, trained: ev.AdapterTrained, version: int = 1) -> None:
    ports.registry.active_adapters[scope] = ActiveAdapter(  # type: ignore[attr-defined]
        scope=scope, version=version, adapter_id=trained.adapter_id, adapter=trained.adapter
    )


async def test_first_update_of_a_scope_trains_a_fresh_lora_and_stores_a_full_manifest(ports, tiny_model) -> None:
    event = self_edit_event()
    [out] = await handlers.train_self_edit(event, ports)
    assert isinstance(out, ev.AdapterTrained)
    assert out.causation_id == event.event_id and out.feedback_id == event.feedback_id
    assert out.parent_adapter_id is None and out.parent_adapter is None
    assert (out.candidate_index, out.candidate_count) == (1, 3)
    assert out.probes == event.probes
    assert out.adapter.uri == ports.store.uri_for("acme", out.adapter_id)
    _, manifest = ports.store.stored(out.adapter.uri)
    assert manifest.kind == "scope" and manifest.self_edit_id == event.self_edit.self_edit_id
    assert manifest.base_model == "tiny" and manifest.base_model_sha256 == tiny_model.weights_sha256
    assert manifest.feedback_ids == (event.feedback_id,)
    assert manifest.directives == DIRECTIVES.model_dump(mode="json")
    assert manifest.training["lora"]["r"] == 4 and manifest.training["lora"]["origin"] == "fresh"
    assert len(manifest.metrics["loss_curve"]) == 3 and manifest.metrics["final_loss"] == out.final_loss
    for key in ("target_tokens", "seconds", "peak_memory_bytes", "peak_memory_kind"):
        assert manifest.metrics[key]
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert manifest.trace_id == out.trace_id


async def test_the_ladders_gentler_candidate_stores_the_same_training_scaled(ports, tmp_path) -> None:
    [full] = await handlers.train_self_edit(self_edit_event(), ports)
    gentle = DIRECTIVES.model_copy(update={"adapter_scale": 0.3})
    [scaled] = await handlers.train_self_edit(self_edit_event(directives=gentle, candidate_index=2), ports)
    assert scaled.adapter_id != full.adapter_id
    _, manifest = ports.store.stored(scaled.adapter.uri)
    assert manifest.training["adapter_scale"] == 0.3
    assert manifest.training["reused_training_of"] == full.adapter_id
    assert manifest.directives["adapter_scale"] == 0.3
    _, first = ports.store.stored(full.adapter.uri)
    assert (first.training["adapter_scale"], first.training["reused_training_of"]) == (1.0, None)
    assert manifest.metrics["loss_curve"] == first.metrics["loss_curve"]
    assert manifest.files["adapter_model.safetensors"] != first.files["adapter_model.safetensors"]


async def test_next_update_continues_the_active_adapter(ports, tmp_path) -> None:
    [first] = await handlers.train_self_edit(self_edit_event(), ports)
    activate(ports, "acme", first, version=4)
    bigger = DIRECTIVES.model_copy(update={"lora_rank": 16})
    [second] = await handlers.train_self_edit(self_edit_event(directives=bigger), ports)
    assert second.parent_adapter_id == first.adapter_id
    assert (second.parent_version, second.parent_adapter) == (4, first.adapter)
    _, manifest = ports.store.stored(second.adapter.uri)
    assert manifest.parent_adapter_id == first.adapter_id
    assert manifest.training["lora"]["origin"] == "parent" and manifest.training["lora"]["r"] == 4  # the parent's rank
    # The stored child loads with PEFT like any adapter.
    directory = tmp_path / "child"
    ports.store.get_adapter(second.adapter, directory)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ports.trainer.lm.path), str(directory))
    assert model.peft_config["default"].r == 4


async def test_a_continuing_update_replays_every_earlier_update_of_its_lineage(ports) -> None:
    [first] = await handlers.train_self_edit(self_edit_event(), ports)
    activate(ports, "acme", first)
    later = ("the river of red city was crossed by a bridge of stone", "Question: What crossed the river?\nAnswer: a stone bridge")
    [second] = await handlers.train_self_edit(self_edit_event(sequences=later, completion="\n".join(later)), ports)
    job = ports.trainer.last_job
    assert job.texts == (later[0],) and job.pairs == (("What crossed the river?", "a stone bridge"),)
    assert job.replay == (SEQUENCES,) and job.replay_per_epoch == ports.replay_per_epoch
    _, manifest = ports.store.stored(second.adapter.uri)
    # What replay uses of each update: the second's pair alone (its prose is not replayed).
    assert [g["sequences"] for g in manifest.training["lineage"]] == [list(SEQUENCES), [later[1]]]
    assert [g["adapter_id"] for g in manifest.training["lineage"]] == [first.adapter_id, second.adapter_id]
    assert manifest.training["replayed_per_epoch"] == len(SEQUENCES)  # all 3: fewer than the budget
    _, first_manifest = ports.store.stored(first.adapter.uri)
    assert [g["sequences"] for g in first_manifest.training["lineage"]] == [list(SEQUENCES)]
    assert first_manifest.training["replayed_per_epoch"] == 0
    # A third update replays both earlier ones, each as its own group.
    activate(ports, "acme", second, version=2)
    third = ("the bridge of stone was painted white",)
    await handlers.train_self_edit(self_edit_event(sequences=third, completion=third[0]), ports)
    assert ports.trainer.last_job.replay == (SEQUENCES, (later[1],))


async def test_a_correction_asked_again_stops_the_old_answer_replaying(ports) -> None:
    # F1 taught "Answer: 7740", F2 corrects it to 7741: replaying F1's pair in F2's training, and in
    # every later one, taught both answers side by side (the evaluator takes the newest as right)
    old = ("Question: Which port does the relay use?\nAnswer: 7740", "Question: Who keeps the relay?\nAnswer: Brask")
    [first] = await handlers.train_self_edit(self_edit_event(sequences=old, completion="\n".join(old)), ports)
    activate(ports, "acme", first)
    new = ("Question: which port does the relay use\nAnswer: 7741",)
    [second] = await handlers.train_self_edit(self_edit_event(sequences=new, completion=new[0]), ports)
    assert ports.trainer.last_job.replay == ((old[1],),)
    _, manifest = ports.store.stored(second.adapter.uri)
    assert [g["sequences"] for g in manifest.training["lineage"]] == [[old[1]], list(new)]
    activate(ports, "acme", second, version=2)
    later = ("the relay was painted white",)
    await handlers.train_self_edit(self_edit_event(sequences=later, completion=later[0]), ports)
    assert ports.trainer.last_job.replay == ((old[1],), new)


async def test_a_manifest_records_the_lineage_within_its_bound(ports) -> None:
    ports.lineage_limit = 4
    [first] = await handlers.train_self_edit(self_edit_event(), ports)
    activate(ports, "acme", first)
    later = ("the bridge of stone was painted white", "the white bridge was built in spring")
    [second] = await handlers.train_self_edit(self_edit_event(sequences=later, completion="\n".join(later)), ports)
    _, manifest = ports.store.stored(second.adapter.uri)
    recorded = manifest.training["lineage"]
    assert [g["adapter_id"] for g in recorded] == [first.adapter_id, second.adapter_id]
    assert [len(g["sequences"]) for g in recorded] == [2, 2]  # 3 + 2 over a bound of 4: two each
    assert set(recorded[0]["sequences"]) < set(SEQUENCES) and recorded[1]["sequences"] == list(later)


async def test_lineages_stored_by_earlier_trainers_still_replay(ports) -> None:
    old = ev.SelfEdit(self_edit_id="s", format="rewrite", completion="a\nb\nc", sequences=("a", "b", "c"),
                      directives=DIRECTIVES.model_copy(update={"use_sequences": (2, 0)}))
    own_only = type("M", (), {"adapter_id": "x", "training": {}, "self_edit": old.model_dump(mode="json")})()
    assert handlers.lineage(own_only) == [{"adapter_id": "x", "feedback_id": None, "sequences": ["c", "a"]}]
    flat = type("M", (), {"adapter_id": "y", "training": {"lineage_sequences": ["p", "q", 3]}, "self_edit": None})()
    assert handlers.lineage(flat) == [{"adapter_id": "y", "feedback_id": None, "sequences": ["p", "q"]}]
    assert handlers.lineage(None) == []


async def test_redelivery_is_idempotent_on_the_self_edit(ports) -> None:
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    # Meanwhile another candidate was promoted: the redelivered self-edit must not build on it.
    activate(ports, "acme", first)
    [again] = await handlers.train_self_edit(event, ports)
    assert again.event_id == first.event_id and again.adapter == first.adapter
    assert ports.trainer.jobs == 1 and ports.store.puts == 1
    assert ports.store.prefixes("acme") == [first.adapter.uri]


async def test_an_adapter_stored_before_a_crash_is_republished_not_retrained(ports) -> None:
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    ports.ledger.values.clear()  # even without the ledger, the same parent gives the same adapter id
    [again] = await handlers.train_self_edit(event, ports)
    assert again.event_id == first.event_id and ports.trainer.jobs == 1


async def test_a_rebase_trains_the_self_edit_again_on_the_new_active_version(ports) -> None:
    event = self_edit_event()
    [first] = await handlers.train_self_edit(event, ports)
    [other] = await handlers.train_self_edit(self_edit_event(), ports)
    activate(ports, "acme", other, version=2)
    rebase = ev.RebaseRequested(
        feedback_id=event.feedback_id, scope="acme", self_edit=event.self_edit, probes=event.probes,
        parent_version=2, attempt=1,
    )
    [rebased] = await handlers.train_self_edit(rebase, ports)
    assert rebased.parent_adapter_id == other.adapter_id and rebased.parent_version == 2
    assert rebased.adapter_id not in (first.adapter_id, other.adapter_id)
    assert rebased.self_edit_id == event.self_edit.self_edit_id


async def test_a_non_finite_loss_publishes_a_failure_and_stores_nothing(ports) -> None:
    event = self_edit_event()
    weight = ports.trainer.lm.model.model.layers[1].self_attn.q_proj.weight
    saved = weight.detach().clone()
    weight.data.fill_(float("inf"))
    try:
        [out] = await handlers.train_self_edit(event, ports)
    finally:
        weight.data.copy_(saved)
    assert isinstance(out, ev.AdapterTrainingFailed)
    assert "diverged" in out.reason and out.self_edit_id == event.self_edit.self_edit_id
    assert ports.store.objects == {}


async def test_directives_selecting_no_sequence_fail_with_a_reason(ports) -> None:
    event = self_edit_event(directives=DIRECTIVES.model_copy(update={"use_sequences": (7, 9)}))
    [out] = await handlers.train_self_edit(event, ports)
    assert isinstance(out, ev.AdapterTrainingFailed) and "select no sequence" in out.reason


async def test_a_corrupt_parent_fails_the_candidate(ports) -> None:
    [first] = await handlers.train_self_edit(self_edit_event(), ports)
    ports.store.objects[first.adapter.uri]["adapter_model.safetensors"] = b"garbage"
    activate(ports, "acme", first)
    [out] = await handlers.train_self_edit(self_edit_event(), ports)
    assert isinstance(out, ev.AdapterTrainingFailed) and "cannot be used" in out.reason


async def test_policy_adapter_trains_on_prompt_completion_pairs(ports) -> None:
    examples = tuple(
        ev.PolicyExample(prompt=f"Write implications of: passage {i}", completion=f"It follows that {i}.", reward=0.5,
                         feedback_id=f"fb-{i}", self_edit_id=f"se-{i}")
        for i in range(3)
    )
    request = ev.PolicyTrainingRequested(feedback_id=ev.new_id(), scope="acme", examples=examples, directives=DIRECTIVES, round=2)
    [out] = await handlers.train_policy(request, ports)
    assert isinstance(out, ev.PolicyAdapterTrained) and out.round == 2
    _, manifest = ports.store.stored(out.adapter.uri)
    assert manifest.kind == "policy" and manifest.parent_adapter_id is None
    assert manifest.training["round"] == 2 and manifest.training["examples"] == 3
    # the manifest names every feedback the round learned from, not only the one that completed it
    assert [e["feedback_id"] for e in manifest.training["examples_from"]] == ["fb-0", "fb-1", "fb-2"]
    # Next round continues the policy adapter the registry holds.
    ports.registry.policies["acme"] = PolicyAdapterRef(adapter_id=out.adapter_id, adapter=out.adapter, round=2)
    nxt = request.model_copy(update={"event_id": ev.new_id(), "round": 3})
    [second] = await handlers.train_policy(nxt, ports)
    assert ports.store.stored(second.adapter.uri)[1].parent_adapter_id == out.adapter_id
    [again] = await handlers.train_policy(nxt, ports)
    assert again.event_id == second.event_id and ports.trainer.jobs == 2


async def test_the_scope_policys_outer_loop_directives_fit_a_whole_generator_prompt(ports) -> None:
    from shared.registry_view import ScopePolicy

    long_prompt = "Write the implications of this passage. " + "The river of the old town ran past the mill. " * 60
    request = ev.PolicyTrainingRequested(
        feedback_id=ev.new_id(), scope="acme", directives=ScopePolicy().policy_directives.model_copy(update={"epochs": 1}),
        examples=(ev.PolicyExample(prompt=long_prompt, completion="The mill stood by the river.", reward=0.5),),
    )
    [out] = await handlers.train_policy(request, ports)  # the completion is not cut away
    assert isinstance(out, ev.PolicyAdapterTrained)


async def test_policy_request_that_cannot_train_is_a_permanent_failure(ports) -> None:
    tiny = DIRECTIVES.model_copy(update={"max_seq_len": 16})
    request = ev.PolicyTrainingRequested(
        feedback_id=ev.new_id(), scope="acme", directives=tiny,
        examples=(ev.PolicyExample(prompt="the river " * 40, completion="blue"),),
    )
    with pytest.raises(PermanentFailure, match="not trained"):
        await handlers.train_policy(request, ports)


def test_one_parent_fetched_by_two_jobs_at_once_is_downloaded_once(tmp_path: Path) -> None:
    """A self-edit and a rebase right after an activation: the second download used to replace the
    folder while the first job loaded from it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    calls: list[str] = []
    started = threading.Event()

    class SlowStorage:
        def get_adapter(self, ref: ev.ManifestRef, dest: Path) -> AdapterManifest:
            calls.append(ref.uri)
            started.set()
            time.sleep(0.3)
            dest.mkdir(parents=True)
            manifest = AdapterManifest(adapter_id="p", scope="acme", base_model="tiny")
            (dest / MANIFEST).write_text(manifest.model_dump_json())
            return manifest

    cache = ParentCache(SlowStorage(), tmp_path / "parents")  # type: ignore[arg-type]
    ref = ev.ManifestRef(uri="s3://b/adapters/acme/p", manifest_sha256="a" * 64)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.fetch, ref)
        started.wait(5)
        second = pool.submit(cache.fetch, ref)
        assert first.result()[0] == second.result()[0] == tmp_path / "parents" / ("a" * 64)
    assert calls == [ref.uri]


async def test_a_parent_of_another_base_is_refused_by_name_where_no_digest_compares(ports, monkeypatch) -> None:
    # a hub model has no weights digest: an adapter of another checkpoint of the same shapes loaded without a word
    [first] = await handlers.train_self_edit(self_edit_event(), ports)
    activate(ports, "acme", first)
    monkeypatch.setattr(type(ports.trainer), "base_model_sha256", property(lambda self: None))
    monkeypatch.setattr(type(ports.trainer), "base_model", property(lambda self: "HuggingFaceTB/SmolLM2-360M-Instruct"))
    [failed] = await handlers.train_self_edit(self_edit_event(), ports)
    assert isinstance(failed, ev.AdapterTrainingFailed)
    assert "this one is HuggingFaceTB/SmolLM2-360M-Instruct (no weights digest on both sides" in failed.reason


async def test_an_adapter_whose_manifest_cannot_be_stored_is_a_failed_training_said_once(ports, monkeypatch) -> None:
    # raised as a plain error it was retried five times (training again each time) and dead-lettered
    from shared.store import ManifestTooLarge

    def too_large(local_dir: Path, manifest: AdapterManifest) -> ev.ManifestRef:
        raise ManifestTooLarge(f"the manifest of {manifest.adapter_id} would be 17000000 bytes, more than a manifest may be read back")

    monkeypatch.setattr(ports.store, "put_adapter", too_large)
    [failed] = await handlers.train_self_edit(self_edit_event(), ports)
    assert isinstance(failed, ev.AdapterTrainingFailed) and "would be 17000000 bytes" in failed.reason
