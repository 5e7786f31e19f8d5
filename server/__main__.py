"""`python -m server`: read settings, build the app, serve it."""

import logging
import sys

import uvicorn

from .api.app import create_app
from .config import parse_settings
from .engine.loader import ModelLoadError


def main() -> None:
    settings = parse_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
