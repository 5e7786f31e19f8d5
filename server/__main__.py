"""`python -m server`: read settings, build the app, serve it."""

import os
import sys

# oneDNN (torch's CPU matrix kernels) keeps a compiled kernel for each input shape it has seen, up to 1,024 of them
# (about 0.27 MiB each here): under traffic of every batch size and prompt length that is 270 MiB held for good.
# A step uses a handful of shapes, so 64 keep the steady state fast with the memory bounded. Set before torch loads.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
# On a GPU the KV buffers are reallocated at growing sizes; expandable segments let the caching allocator grow one
# mapping instead of leaving blocks of every old size behind (fragmentation the KV budget does not count).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from . import logs
from .config import model_path_problem, parse_settings


def main() -> None:
    settings = parse_settings()
    if problem := model_path_problem(settings.model):
        sys.exit(f"error: {problem}")
    import uvicorn  # torch and transformers come with the app: seconds

    from .api.app import create_app
    from .api.protocol import ConnectionLimits, protocol_class
    from .engine.loader import ModelLoadError

    logs.setup(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    limits = ConnectionLimits(settings.header_timeout, settings.body_timeout, settings.write_timeout,
                              settings.max_connections, app.state.metrics.dropped_connection)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           log_config=None, http=protocol_class(limits),
                                           timeout_keep_alive=settings.keep_alive_timeout))
    app.state.exit = lambda: setattr(server, "should_exit", True)  # after the drain on SIGTERM
    server.run()


if __name__ == "__main__":
    main()
