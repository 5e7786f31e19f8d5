"""`python -m server`: read settings, build the app, serve it."""

import sys

import uvicorn

from . import logs
from .api.app import create_app
from .config import parse_settings
from .engine.loader import ModelLoadError


def main() -> None:
    settings = parse_settings()
    logs.setup(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           log_config=None))
    app.state.exit = lambda: setattr(server, "should_exit", True)  # after the drain on SIGTERM
    server.run()


if __name__ == "__main__":
    main()
