"""Mounting the UI on the serving app: the page, its static scripts, and the library and playground API.

The page and its scripts are the only routes open without the token: they are the same files for every
user and hold no data; the page asks for the token and sends it as a bearer header on every API call (no
cookie, so another site cannot make a logged-in browser send requests). Every /ui/api route keeps needing
it. The static mount is at /ui/static, apart from /ui/api, so routes added after it (the training part's)
are never shadowed by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from difflora.serving.engine import Engine

STATIC = Path(__file__).parent / "static"
PAGE_PATHS = ("/", "/ui", "/ui/")
STATIC_PREFIX = "/ui/static/"
API_PREFIX = "/ui/api"


def public_path(path: str) -> bool:
    """Whether `path` is the UI's page or one of its static files (served without the token)."""
    return path in PAGE_PATHS or path.startswith(STATIC_PREFIX)


def install_ui(app: FastAPI, engine: Engine) -> None:
    """Add the UI to `app` (create_app calls it): the page at /ui/ (/ redirects there), its files at
    /ui/static/, the library and playground API under /ui/api."""
    from difflora.webui.library_routes import add_library_routes
    from difflora.webui.playground import add_playground_routes

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/ui", include_in_schema=False)
    def ui_no_slash() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/ui/", include_in_schema=False)
    def page() -> FileResponse:
        # no-cache: a new difflora's page must not run against an old cached app.js
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    add_library_routes(app, engine)
    add_playground_routes(app, engine)
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC), name="ui-static")
