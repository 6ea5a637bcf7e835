"""The library's HTTP routes: GET /ui/api/adapters (the cards), GET /ui/api/adapters/{name} (one card's
whole story), GET /ui/api/files/{root}/{path} (a picture or log from an adapter folder or --data-root,
confined there by difflora.webui.files). Reading adapters is file I/O: the routes are plain `def`s, run
on the thread pool, never on the event loop."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from difflora.webui.files import confined_file, ui_roots
from difflora.webui.library import adapter_detail, library
from difflora.webui.paths import WebUIError

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
        except WebUIError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        return _safe_file(path)


# what the UI shows inline; anything else (an .html or .svg someone put under --data-root, say) is a
# download, sandboxed: a file must never run script in the UI's origin, where the token is kept
INLINE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
    ".toml": "text/plain; charset=utf-8",
}


def _safe_file(path: Path) -> FileResponse:
    media_type = INLINE_TYPES.get(path.suffix.lower())
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}
    if media_type is None:
        return FileResponse(path, media_type="application/octet-stream", filename=path.name, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)
