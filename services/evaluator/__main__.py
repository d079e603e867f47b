"""Run the evaluator: ``python -m services.evaluator`` (settings from SEAL_* environment variables)."""

from __future__ import annotations

from services.evaluator.app import create_app
from services.evaluator.settings import EvaluatorSettings
from shared.runtime import serve


def main() -> None:
    settings = EvaluatorSettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
