"""A live `difflora serve` app and a headless Chromium page on it: the web UI's browser tests.

The server is the real thing minus the model loading: `create_app` over an Engine the test built, served by
uvicorn in a thread on a free loopback port (bound before the thread starts, so no other process can take
it). The browser is Debian's /usr/bin/chromium (apt-get install chromium; .ci/run installs it when missing),
driven by Playwright's Python package through `executable_path`: Playwright's own browser download
(`playwright install`) is never used. Every page collects its console errors and uncaught exceptions;
each test ends with `page.assert_clean()`.

Fixtures (tests/conftest.py):
    live_server(engine, token=None, data_root=None) -> LiveServer   # a factory; stopped after the test
    ui_page -> UiPage                                              # a fresh browser context and page
Example:
    def test_x(live_server, ui_page, engine):
        server = live_server(engine, token="t0k")
        ui_page.open(server, "#/library")          # token given: stored in sessionStorage first
        ui_page.page.wait_for_selector(".card")
        ui_page.shot("library")                     # $DIFFLORA_UI_SHOTS or $TMPDIR/ui-shots/library.png
        ui_page.assert_clean()
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from difflora.serving.app import create_app

CHROMIUM = Path(os.environ.get("DIFFLORA_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("DIFFLORA_UI_SHOTS") or Path(tempfile.gettempdir()) / "ui-shots")
TOKEN_KEY = "difflora-token"  # static/lib/api.js's sessionStorage key
START_SECONDS = 20.0


@dataclass
class LiveServer:
    url: str
    app: Any
    token: str | None
    server: uvicorn.Server
    thread: threading.Thread

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, **options: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(), timeout=120, **options)

    def post(self, path: str, json: Any, **options: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=json, headers=self.headers(), timeout=120, **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(
    engine: Any, *, token: str | None = None, data_root: Path | None = None, **app_options: Any
) -> LiveServer:
    """`engine` served by uvicorn on 127.0.0.1 in a daemon thread, as `difflora serve` serves it."""
    app = create_app(engine, token=token, data_root=data_root, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ui-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"The test server on port {port} did not start within {START_SECONDS:g} s.")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, token, server, thread)


@dataclass
class UiPage:
    """A Playwright page with what went wrong on it: console errors and uncaught page errors."""

    page: Any
    errors: list[str] = field(default_factory=list)

    def watch(self) -> UiPage:
        self.page.on(
            "console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        return self

    def open(self, server: LiveServer, hash_: str = "#/library", *, with_token: bool = True) -> None:
        """Open the UI at `hash_`; with `with_token` and a server token, as a user who already gave it."""
        if server.token and with_token:
            self.page.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, {server.token!r})")
        self.page.goto(f"{server.url}/ui/{hash_}")

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def fetch_bytes(self, url: str) -> bytes:
        """The bytes behind a URL as the page sees them (blob: and object URLs included)."""
        values = self.page.evaluate(
            "async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", url
        )
        return bytes(values)

    def assert_clean(self, expected: Iterable[str] = ()) -> None:
        """No console error and no uncaught exception, but those matching an `expected` regex."""
        patterns = [re.compile(p) for p in expected]
        unexpected = [e for e in self.errors if not any(p.search(e) for p in patterns)]
        assert not unexpected, "the page logged errors:\n" + "\n".join(unexpected)


def launch_chromium(playwright: Any) -> Any:
    if not CHROMIUM.is_file():
        raise RuntimeError(
            f"No Chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium) or set DIFFLORA_CHROMIUM."
        )
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
