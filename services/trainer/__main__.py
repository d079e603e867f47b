"""``python -m services.trainer``: build the settings once and serve."""

from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
from shared.runtime import serve


def main() -> None:
    settings = TrainerSettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
