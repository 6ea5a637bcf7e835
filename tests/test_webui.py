"""The web UI's API (difflora.webui), no browser: the library's cards against what the files and the run
folder hold, path confinement of the file route (`..`, absolute paths, symlinks out), the token on the
API but not on the page, and the sweep grid against the API's own images."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from difflora.config import tomllib
from difflora.formats.consumers.verdicts import file_verdicts
from difflora.generation.pipeline import image_grid
from difflora.serving.app import create_app
from difflora.serving.engine import Engine
from tests.support.models import tiny_pipeline
from tests.support.webui import GRID_STEPS, IMAGES, STEPS, TIMING, TRAINED, TRIGGER, loss_rows, write_library

TOKEN = "s3cret-token"
SECRET = "what no route may show"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("ui_tiny"))


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory, pipe) -> Path:
    return write_library(pipe, tmp_path_factory.mktemp("ui_library"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui_data")
    (root / "set").mkdir()
    (root / "set" / "a.txt").write_text("a caption")
    return root


@pytest.fixture(scope="module")
def engine(pipe, library_dir) -> Engine:
    return Engine(pipe, adapter_dir=[str(library_dir)])


@pytest.fixture(scope="module")
def client(engine, data_root):
    with TestClient(create_app(engine, data_root=data_root)) as test_client:
        yield test_client


def cards_by_name(client) -> dict[str, dict]:
    response = client.get("/ui/api/adapters")
    assert response.status_code == 200, response.text
    return {card["name"]: card for card in response.json()["adapters"]}


def test_cards_hold_each_adapters_facts_and_verdicts(client, library_dir) -> None:
    cards = cards_by_name(client)
    assert list(cards) == ["style", "subject", TRAINED]
    # rank/alpha/targets as tests/support/webui.py made them (random_adapter's alpha default: 4)
    expect = {
        "style": {
            "unet": (4, 4.0, ["to_k", "to_out.0", "to_q", "to_v"]),
            "text_encoder": (4, 4.0, ["q_proj"]),
        },
        "subject": {"unet": (2, 1.0, ["to_k", "to_v"])},
        TRAINED: {"unet": (8, 8.0, ["to_q", "to_v"])},
    }
    for name, card in cards.items():
        path = library_dir / f"{name}.safetensors"
        assert card["bytes"] == path.stat().st_size and card["file"] == path.name
        got = {c: (f["rank"], f["alpha"], f["targets"]) for c, f in card["components"].items()}
        assert got == expect[name]
        assert [v["summary"] for v in card["verdicts"]] == [v.summary() for v in file_verdicts(path)]
    trained = cards[TRAINED]
    assert (trained["trigger_words"], trained["steps"], trained["images"]) == ([TRIGGER], STEPS, IMAGES)
    assert trained["base_model"] == "embedded-test" and trained["created"]
    assert cards["style"]["steps"] is None and cards["style"]["sample_grid"] is None


def test_a_cards_pictures_are_its_runs_last_grid_and_loss_curve(client, library_dir) -> None:
    card = cards_by_name(client)[TRAINED]
    run = library_dir / f"{TRAINED}.run"
    last = run / "samples" / f"step-{GRID_STEPS[-1]:06d}.png"  # not the -ema grid written after it
    assert client.get(card["sample_grid"]).content == last.read_bytes()
    assert client.get(card["loss_curve"]).content == (run / "loss.png").read_bytes()


def test_a_cards_page_has_the_training_configuration_and_timing(client) -> None:
    detail = client.get(f"/ui/api/adapters/{TRAINED}").json()
    assert detail["config"]["train"]["max_steps"] == STEPS
    assert detail["config"]["train"]["trigger"] == TRIGGER
    assert detail["config"] == tomllib.loads(detail["config_toml"])
    assert detail["timing"] == TIMING
    assert detail["plan"] == "20 steps of 4 images\n"
    want = [(int(r["step"]), float(r["loss"]), float(r["smoothed_loss"])) for r in loss_rows()]
    assert [(r["step"], r["loss"], r["smoothed"]) for r in detail["loss"]] == want
    assert [g["name"] for g in detail["sample_grids"]] == ["step-000010", "step-000020", "step-000020-ema"]
    assert client.get("/ui/api/adapters/nope").status_code == 404
    assert client.get("/ui/api/adapters/..%2Fstyle").status_code in (404, 422)


# ------------------------------------------------------------------------------------ path confinement


@pytest.fixture(scope="module")
def escapes(library_dir, tmp_path_factory) -> Path:
    """A secret outside every root, a symlinked file and a symlinked folder leading to it."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET)
    os.symlink(outside / "secret.txt", library_dir / "leak.txt")
    os.symlink(outside, library_dir / "elsewhere")
    return outside


@pytest.mark.parametrize(
    ("url", "status"),
    [
        (
            "/ui/api/files/adapters0/%2E%2E/outside/secret.txt",
            403,
        ),  # .. (percent-encoded: clients normalise it)
        ("/ui/api/files/adapters0/trained.run/%2E%2E/%2E%2E/x", 403),
        ("/ui/api/files/adapters0/%2Fetc%2Fpasswd", 403),  # absolute
        ("/ui/api/files/adapters0//etc/passwd", 403),
        ("/ui/api/files/data/%2E%2E%2Fui_library0%2Fstyle.safetensors", 403),
        ("/ui/api/files/adapters0/leak.txt", 403),  # a symlinked file out
        ("/ui/api/files/adapters0/elsewhere/secret.txt", 403),  # a symlinked folder out
        ("/ui/api/files/adapters0/C:%5Cwindows", 403),
        ("/ui/api/files/elsewhere/secret.txt", 403),  # not a root
        ("/ui/api/files/adapters0/missing.png", 404),
        ("/ui/api/files/adapters0/trained.run", 404),  # a folder is no file
    ],
)
def test_the_file_route_refuses_everything_outside_its_roots(client, escapes, url, status) -> None:
    response = client.get(url)
    assert response.status_code == status, response.text
    assert SECRET not in response.text and "root:x:" not in response.text


def test_the_file_route_serves_files_under_the_adapter_folders_and_data_root(
    client, library_dir, data_root
) -> None:
    assert client.get("/ui/api/files/data/set/a.txt").text == "a caption"
    assert client.get("/ui/api/files/adapters0/trained.run/timing.json").json() == TIMING
    (library_dir / "inside.txt").symlink_to(library_dir / "trained.run" / "plan.txt")  # a link within: fine
    assert client.get("/ui/api/files/adapters0/inside.txt").text == "20 steps of 4 images\n"
    (data_root / "set" / "page.html").write_text("<script>alert(sessionStorage)</script>")
    html = client.get("/ui/api/files/data/set/page.html")  # never a page in the UI's origin
    assert html.headers["content-type"] == "application/octet-stream"
    assert html.headers["content-disposition"].startswith("attachment")
    assert html.headers["content-security-policy"].startswith("sandbox")
    png = client.get("/ui/api/files/adapters0/trained.run/loss.png")
    assert png.headers["content-type"] == "image/png" and png.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------------------------------------ token


def test_the_page_loads_without_the_token_and_every_api_route_needs_it(engine) -> None:
    with TestClient(create_app(engine, token=TOKEN)) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and 'id="token-dialog"' in page.text
        assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
        for asset in ("app.js", "lib/api.js", "pages/library.js", "pages/playground.js", "style.css"):
            assert client.get(f"/ui/static/{asset}").status_code == 200, asset
        for route in ("/ui/api/adapters", "/ui/api/options", f"/ui/api/adapters/{TRAINED}",
                      "/ui/api/files/adapters0/trained.run/loss.png", "/adapters"):  # fmt: skip
            assert client.get(route).status_code == 401, route
            assert client.get(route, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, route
        sweep = {"prompt": "x", "sweep": ["style:0,1"]}
        assert client.post("/ui/api/sweep", json=sweep).status_code == 401
        # the static mount never reaches the API, whatever the path says
        sneaky = client.get("/ui/static/%2E%2E/api/adapters")
        assert sneaky.status_code == 404 and "available" not in sneaky.text
        assert client.get("/ui/static/../api/adapters").status_code in (401, 404)
        assert set(client.cookies.keys()) == set()


# ------------------------------------------------------------------------------------------------ sweep


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_a_sweep_is_the_cli_grid_of_the_apis_own_images(client) -> None:
    common = {"prompt": "a striped cat", "seed": 11, "steps": 2, "width": 16, "height": 16}
    body = {**common, "adapters": "subject:0.5", "sweep": ["style:0,1", "subject:0.25,0.75"]}
    response = client.post("/ui/api/sweep", json=body)
    assert response.status_code == 200, response.text
    cells, labels = [], []
    for subject in (0.25, 0.75):  # rows: the second sweep; columns: the first
        for style in (0, 1):
            spec = f"subject:{subject:g},style:{style:g}"  # the body's adapters first, the sweep's added
            cells.append(
                Image.open(io.BytesIO(client.post("/generate", json={**common, "adapters": spec}).content))
            )
            labels.append(f"style={style:g} subject={subject:g}")
    want = image_grid(cells, rows=2, cols=2, labels=labels)
    assert np.array_equal(decoded(response.content), np.asarray(want.convert("RGB")))
    assert not np.array_equal(np.asarray(cells[0]), np.asarray(cells[3]))


def test_sweeps_past_the_limits_are_refused_in_one_line(client) -> None:
    too_many = client.post(
        "/ui/api/sweep", json={"prompt": "x", "sweep": ["style:0,1,2,3,4,5", "subject:0,1,2,3,4"]}
    )
    assert too_many.status_code == 422 and "at most 25" in too_many.json()["error"]
    three = client.post("/ui/api/sweep", json={"prompt": "x", "sweep": ["style:0", "subject:1", "trained:1"]})
    assert three.status_code == 422 and "at most 2" in three.json()["error"]
    assert client.post("/ui/api/sweep", json={"prompt": "x", "sweep": []}).status_code == 422
    assert client.post("/ui/api/sweep", json={"prompt": "x", "sweep": ["nope:0,1"]}).status_code == 404


def test_options_offer_the_models_samplers_and_limits(client, engine) -> None:
    from difflora.config.schedulers import SCHEDULER_NAMES

    options = client.get("/ui/api/options").json()
    assert options["samplers"] == list(SCHEDULER_NAMES)
    assert options["limits"]["steps"] == engine.limits.max_steps
    assert json.dumps(options["defaults"]["steps"]) == "20"
