"""The web playground: one static page at `/` (files in server/playground/, no build step, nothing fetched from
elsewhere) that calls this server's own /v1 routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FILES = Path(__file__).resolve().parent.parent / "playground"
# its Content-Security-Policy (this server only) is on every response, from the request middleware
HEADERS = {"Cache-Control": "no-cache"}


def mount_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(FILES / "index.html", headers=HEADERS)

    app.mount("/playground", StaticFiles(directory=FILES), name="playground")
