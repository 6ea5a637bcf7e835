"""The web UI in a real browser (headless Debian Chromium, tests/support/browser.py): the library page,
the playground's render against the API's PNG, and the token prompt. Screenshots go to
$DIFFLORA_UI_SHOTS (default $TMPDIR/ui-shots/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from difflora.serving.engine import Engine
from tests.support.webui import TRAINED, TRIGGER, write_library

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_pipe():
    from difflora.models.loading import load_pipeline

    return load_pipeline(None)


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory, embedded_pipe) -> Path:
    return write_library(embedded_pipe, tmp_path_factory.mktemp("ui_library"))


@pytest.fixture(scope="module")
def engine(embedded_pipe, library_dir) -> Engine:
    return Engine(embedded_pipe, adapter_dir=[str(library_dir)])


def test_library_page_shows_every_adapter_without_errors(live_server, ui_page, engine) -> None:
    server = live_server(engine)
    ui_page.open(server, "#/library")
    page = ui_page.page
    page.wait_for_selector(f'.card[data-name="{TRAINED}"] img.thumb[src^="blob:"]')
    assert page.locator(".card h3").all_inner_texts() == ["style", "subject", TRAINED]
    trained = page.locator(f'.card[data-name="{TRAINED}"]')
    assert TRIGGER in trained.inner_text()
    ui_page.shot("library")
    ui_page.assert_clean()
