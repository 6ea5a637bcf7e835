"""The library's HTTP routes: GET /ui/api/adapters (the cards), GET /ui/api/adapters/{name} (one card's
whole story), GET /ui/api/files/{root}/{path} (a picture or log from an adapter folder or --data-root,
confined there by difflora.webui.files). Reading adapters is file I/O: the routes are plain `def`s, run
on the thread pool, never on the event loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from difflora.webui.files import OutsideRootsError, confined_file, ui_roots
from difflora.webui.library import adapter_detail, library

if TYPE_CHECKING:
    from difflora.serving.engine import Engine


def add_library_routes(app: FastAPI, engine: Engine) -> None:
    def roots(request: Request) -> dict:
        return ui_roots(engine.directories, request.app.state.data_root)

    @app.get("/ui/api/adapters")
    def cards(request: Request) -> dict[str, Any]:
        items = library(engine.available(), roots(request))
        bases = sorted({c.get("base_model") or "unknown" for c in items if "error" not in c})
        identity = engine.identity
        return {"adapters": items, "bases": bases, "model": identity.name, "family": identity.family}

    @app.get("/ui/api/adapters/{name}")
    def detail(name: str, request: Request) -> dict[str, Any]:
        path = engine.find(name)  # a bare name in the adapter folders; unknown: 404
        return adapter_detail(name, path, roots(request))

    @app.get("/ui/api/files/{root}/{relative:path}", response_model=None)
    def file(root: str, relative: str, request: Request) -> Response:
        try:
            path = confined_file(roots(request), root, relative)
        except OutsideRootsError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        return FileResponse(path)
