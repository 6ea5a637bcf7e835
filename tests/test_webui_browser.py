"""The web UI in a real browser (headless Debian Chromium, tests/support/browser.py): the library page,
the playground's render against the API's PNG, and the token prompt. Screenshots go to
$DIFFLORA_UI_SHOTS (default $TMPDIR/ui-shots/)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from difflora.serving.engine import Engine
from tests.support.webui import TRAINED, TRIGGER, write_library

TOKEN = "browser-t0ken"
PROMPT = "a striped cat"

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
    page.fill("#search", TRIGGER.split()[1])  # a trigger word finds its adapter
    assert page.locator(".card h3").all_inner_texts() == [TRAINED]
    page.fill("#search", "sub")  # so does a part of the name
    assert page.locator(".card h3").all_inner_texts() == ["subject"]
    page.fill("#search", "")
    page.select_option("#filter-base", "embedded-test")
    assert page.locator(".card h3").all_inner_texts() == [TRAINED]
    page.click(f'.card[data-name="{TRAINED}"] h3 a')
    page.wait_for_selector("table.facts")
    text = page.locator("main").inner_text()
    assert "max_steps" in text and "forward" in text and "step-000020" in text
    ui_page.shot("library-detail")
    ui_page.assert_clean()


def test_playground_shows_the_apis_png_for_the_same_request(live_server, ui_page, engine) -> None:
    server = live_server(engine)
    ui_page.open(server, "#/playground")
    page = ui_page.page
    page.wait_for_selector("#generate")
    page.fill("textarea[name=prompt]", PROMPT)
    page.fill("input[name=seed]", "5")
    page.fill("input[name=steps]", "2")
    for name in ("style", "subject"):
        page.select_option("#adapter-choice", name)
        page.click("#add-adapter")
    subject = page.locator('.adapter-row[data-name="subject"] input.weight')
    for _ in range(3):  # the slider moved three notches left: 1 -> 0.85
        subject.press("ArrowLeft")
    page.uncheck('.adapter-row[data-name="style"] input.te-linked')
    style_te = page.locator('.adapter-row[data-name="style"] input.te-weight')
    for _ in range(2):
        style_te.press("ArrowLeft")
    page.click("#generate")
    image = page.wait_for_selector("#result-image")
    shown = ui_page.fetch_bytes(image.get_attribute("src"))
    form = {name: page.input_value(f"[name={name}]") for name in ("width", "height", "guidance", "scheduler")}
    body = {
        "prompt": PROMPT, "seed": 5, "steps": 2, "adapters": "style:1:0.9,subject:0.85",
        "width": int(form["width"]), "height": int(form["height"]), "guidance": float(form["guidance"]),
        "scheduler": form["scheduler"], "negative_prompt": page.input_value("[name=negative_prompt]"),
    }  # fmt: skip
    api = server.post("/generate", json=body)
    assert api.status_code == 200, api.text
    assert shown == api.content  # the PNG itself: pixels and its A1111 parameters chunk
    parameters = Image.open(io.BytesIO(api.content)).info["parameters"]
    assert page.inner_text("#result-parameters") == parameters
    link = page.locator("#result-download")
    assert link.get_attribute("href") == image.get_attribute("src") and link.get_attribute(
        "download"
    ).endswith(".png")
    page.fill("input[name=seed]", "6")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#history .history-item').length === 2")
    ui_page.shot("playground")
    page.select_option("#sweep-a", "style")
    page.fill("#sweep-a-weights", "0,1")
    page.click("#sweep-button")
    grid = page.wait_for_selector("#sweep-image")
    sweep = server.post("/ui/api/sweep", json={**body, "seed": 6, "sweep": ["style:0,1"]})
    assert sweep.status_code == 200, sweep.text
    assert ui_page.fetch_bytes(grid.get_attribute("src")) == sweep.content
    ui_page.shot("playground-sweep")
    ui_page.assert_clean()


def test_a_page_opened_without_the_token_asks_for_it(live_server, ui_page, engine) -> None:
    server = live_server(engine, token=TOKEN)
    ui_page.open(server, "#/library", with_token=False)
    page = ui_page.page
    page.wait_for_selector("#token-dialog[open]")
    assert page.locator(".card").count() == 0
    ui_page.shot("token")
    page.fill("#token-input", "not-the-token")
    page.click("#token-submit")
    page.wait_for_function("document.getElementById('token-error').textContent.includes('refused')")
    assert page.is_visible("#token-dialog[open]")
    page.fill("#token-input", TOKEN)
    page.click("#token-submit")
    page.wait_for_selector(f'.card[data-name="{TRAINED}"]')
    assert page.evaluate("sessionStorage.getItem('difflora-token')") == TOKEN
    assert page.evaluate("document.cookie") == ""
    assert page.context.cookies() == []
    ui_page.assert_clean(expected=[r"status of 401"])  # the refused calls, which the browser logs
