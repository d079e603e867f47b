"""``python -m services.registry``: run the registry (consumers, HTTP API, request-reply)."""

from __future__ import annotations

from shared.runtime import serve

from .app import create_app
from .settings import RegistrySettings


def main() -> None:
    settings = RegistrySettings()
    serve(create_app(settings), settings)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
