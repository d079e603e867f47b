"""``python -m services.generator``: build settings once and serve."""

from services.generator.app import create_app
from services.generator.settings import GeneratorSettings
from shared.runtime import serve


def main() -> None:
    settings = GeneratorSettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
