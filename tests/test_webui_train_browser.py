"""The Training and Runs pages in a real browser (headless Debian Chromium, tests/support/browser.py): a
20-step run on sample_data started from the page shows its progress and a loss curve of 20 points, then
its adapter is in the library and its run on the Runs page; a run cancelled from the page leaves a
checkpoint, and resuming it from the page trains to the end. Screenshots: train.png, runs.png."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from difflora.serving.engine import Engine
from difflora.training.log import read_loss_csv
from tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.slow

SETTINGS = {"max_steps": "20", "save_every": "2", "sample_every": "10", "batch_size": "2", "resolution": "32"}
MORE = {"sample_steps": "2", "sample_seeds": "1", "num_threads": "1"}


@pytest.fixture(scope="module")
def embedded_pipe():
    from difflora.models.loading import load_pipeline

    return load_pipeline(None)


@pytest.fixture
def setup(tmp_path, embedded_pipe, live_server, monkeypatch):
    """A live server whose data root holds a copy of sample_data/style, and its adapter folder."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, adapters = tmp_path / "data", tmp_path / "adapters"
    shutil.copytree(REPO_ROOT / "sample_data" / "style", root / "style")
    server = live_server(Engine(embedded_pipe, adapter_dir=[str(adapters)]), token="t0k", data_root=root)
    yield server, adapters
    server.app.state.training.close()


def fill_settings(page, name: str) -> None:
    page.wait_for_selector('#train-dataset option[value="style"]', state="attached")
    page.fill("#field-name", name)
    for field, value in SETTINGS.items():
        page.fill(f"#field-{field}", value)
    page.click("#train-form details > summary")
    for field, value in MORE.items():
        page.fill(f"#field-{field}", value)
    page.click("#preflight")
    page.wait_for_selector("#preflight-verdict.ok")
    assert page.inner_text("#preflight-verdict") == "Ready: 20 steps."


def test_a_run_started_from_the_page_shows_progress_then_joins_the_library(setup, ui_page) -> None:
    server, adapters = setup
    page = ui_page.page
    ui_page.open(server, "#/train")
    fill_settings(page, "stripes20")
    page.click("#start")
    page.wait_for_selector('#live-title[data-state="finished"]', timeout=300_000)
    page.wait_for_selector('#curve svg[data-points="20"]')
    assert page.get_attribute("#progress", "data-step") == "20"
    assert len(page.get_attribute("#curve polyline.loss", "points").split()) == 20
    page.wait_for_selector('#samples img[data-step="20"][src^="blob:"]')
    assert page.locator("#samples img").count() == 2  # the grids of steps 10 and 20
    logged = read_loss_csv(adapters / "stripes20.run" / "loss.csv")
    assert [int(row["step"]) for row in logged] == list(range(1, 21))
    page.click("#train-form details > summary")  # folded again: the shot shows the page as it opens
    ui_page.shot("train")
    page.goto(f"{server.url}/ui/#/library")
    page.wait_for_selector('.card[data-name="stripes20"]')
    page.goto(f"{server.url}/ui/#/runs/stripes20")
    page.wait_for_selector('#run-curve svg[data-points="20"]')
    page.wait_for_selector('#run-samples img[src^="blob:"]')
    assert "20 steps" in page.inner_text("#plan") and page.locator("#timing tr").count() > 2
    ui_page.shot("runs")
    ui_page.assert_clean()


def test_a_run_cancelled_from_the_page_resumes_to_the_end(setup, ui_page) -> None:
    server, adapters = setup
    page = ui_page.page
    ui_page.open(server, "#/train")
    fill_settings(page, "cut")
    page.click("#start")
    page.wait_for_function(
        "Number(document.querySelector('#progress')?.dataset.step || 0) >= 3", timeout=300_000
    )
    page.click('.job[data-name="cut"][data-state="running"] button.cancel')
    page.wait_for_selector('#live-title[data-state="cancelled"]', timeout=120_000)
    resume = page.locator('.job[data-name="cut"][data-state="cancelled"] button.resume')
    resume.wait_for()
    checkpoint = int(resume.inner_text().removeprefix("Resume from step "))
    assert 2 <= checkpoint < 20 and not (adapters / "cut.safetensors").exists()
    resume.click()
    page.wait_for_selector('#live-title[data-state="finished"]', timeout=300_000)
    steps = [int(row["step"]) for row in read_loss_csv(adapters / "cut.run" / "loss.csv")]
    assert steps == list(range(1, 21)) and (adapters / "cut.safetensors").is_file()
    ui_page.assert_clean()


def test_a_dataset_uploaded_from_the_page_is_created_and_picked(setup, ui_page, tmp_path) -> None:
    server, _ = setup
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    Image.new("RGB", (8, 8), "red").save(chosen / "a.png")
    Image.new("RGB", (8, 8), "blue").save(chosen / "b.png")
    (chosen / "a.txt").write_text("a red square")
    page = ui_page.page
    ui_page.open(server, "#/train")
    page.wait_for_selector('#train-dataset option[value="style"]', state="attached")
    page.click("details.upload > summary")
    page.fill("#upload-name", "squares")
    page.set_input_files("#upload-files", [str(chosen / name) for name in ("a.png", "a.txt", "b.png")])
    page.click("#upload")
    page.wait_for_selector('#train-dataset option[value="squares"]', state="attached")
    assert page.eval_on_selector("#train-dataset", "select => select.value") == "squares"
    made = server.app.state.data_root / "squares"
    assert sorted(path.name for path in made.iterdir()) == ["a.png", "a.txt", "b.png"]
    assert (made / "a.png").read_bytes() == (chosen / "a.png").read_bytes()
    assert (made / "a.txt").read_text() == "a red square\n"
    ui_page.assert_clean()
