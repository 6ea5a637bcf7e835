"""The web UI's training routes through TestClient: refused without --data-root, every path confined to the
data root, the form generated from TrainConfig as the CLI's flags are, preflight = `difflora check`,
uploads all-or-nothing, past runs read from their folders. The jobs that train (a child process each) are
in tests/test_webui_jobs.py."""

from __future__ import annotations

import base64
import dataclasses
import io
import os

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from difflora.cli import cli
from difflora.cli.train import train_command
from difflora.config import field_help
from difflora.config.train import TrainConfig
from difflora.serving.app import create_app
from difflora.serving.engine import Engine
from difflora.training.log import TrainLog
from tests.support.training import make_workspace

ROUTES = [
    ("GET", "/ui/api/train/form", None),
    ("GET", "/ui/api/train/datasets", None),
    ("POST", "/ui/api/train/datasets", {"name": "x", "files": []}),
    ("POST", "/ui/api/train/preflight", {"dataset": "stripes"}),
    ("GET", "/ui/api/train/jobs", None),
    ("POST", "/ui/api/train/jobs", {"dataset": "stripes"}),
    ("GET", "/ui/api/train/jobs/1", None),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from difflora.models.loading import load_pipeline

    adapters = tmp_path_factory.mktemp("adapters")
    return Engine(load_pipeline(None), adapter_dir=[str(adapters)])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("root"))


@pytest.fixture(scope="module")
def client(engine, root):
    app = create_app(engine, data_root=root)
    with TestClient(app) as client:
        yield client
    app.state.training.close()


def _png(color: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_training_routes_refuse_without_a_data_root(engine):
    with TestClient(create_app(engine)) as client:
        for method, path, body in ROUTES:
            answer = client.request(method, path, json=body)
            assert answer.status_code == 409, (path, answer.text)
            assert answer.json()["error"].startswith(
                "Training from the web UI is off: restart `difflora serve`"
            )
            assert "\n" not in answer.json()["error"]


def test_paths_outside_the_data_root_are_refused(client, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inside").symlink_to(root / "stripes")
    try:
        for name in ("..", "../root", "stripes/../..", str(outside), "/etc", "escape", "escape/x"):
            answer = client.post("/ui/api/train/preflight", json={"dataset": name})
            assert answer.status_code == 403, (name, answer.text)
        model = {"dataset": "stripes", "values": {"model": "../model"}}
        assert client.post("/ui/api/train/preflight", json=model).status_code == 403
        assert client.post("/ui/api/train/preflight", json={"dataset": "missing"}).status_code == 404
        assert "escape" not in client.get("/ui/api/train/datasets").json()["datasets"]
        assert "inside" in client.get("/ui/api/train/datasets").json()["datasets"]  # a link that stays inside
        for field in ("output_dir", "data_dir", "cache_dir"):
            body = {"dataset": "stripes", "values": {field: str(tmp_path)}}
            assert client.post("/ui/api/train/jobs", json=body).status_code == 400
    finally:
        (root / "escape").unlink()
        (root / "inside").unlink()


def test_the_form_is_trainconfigs_fields_as_the_cli_offers_them(client):
    form = client.get("/ui/api/train/form").json()
    fields = form["fields"]
    assert form["server_model"] == client.get("/health").json()["model"]
    helps = field_help(TrainConfig)
    expected = [
        f
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("data_dir", "output_dir", "cache_dir", "resume")
    ]
    assert [field["name"] for field in fields] == [f.name for f in expected]
    flags = {param.name: param for param in train_command.params}
    for field, declared in zip(fields, expected, strict=True):
        assert field["help"] == helps[declared.name]
        default = (
            declared.default_factory()
            if declared.default_factory is not dataclasses.MISSING
            else declared.default
        )
        assert field["default"] == (list(default) if isinstance(default, tuple) else default)
        assert flags[declared.name].help.startswith(field["help"])  # the flag's help is the same text
        if field["kind"] == "choice":
            assert field["choices"] == list(flags[declared.name].type.choices)
        assert field["path"] == (
            declared.name
            in ("model", "clip_l", "t5", "vae", "clip_g", "masks", "preserve_prompts", "validation_dir")
        )
    by_name = {field["name"]: field for field in fields}
    assert by_name["rank"]["kind"] == "int" and by_name["sample_seeds"] == {
        **by_name["sample_seeds"],
        "kind": "list",
        "item": "int",
    }
    assert "euler" in by_name["sample_scheduler"]["choices"]


def test_preflight_is_difflora_checks_report(client, root):
    values = {"model": "model", "resolution": 16, "batch_size": 2, "max_steps": 7}
    answer = client.post("/ui/api/train/preflight", json={"dataset": "stripes", "values": values}).json()
    args = ["check", str(root / "stripes"), "--model", str(root / "model"), "--resolution", "16"]
    printed = CliRunner().invoke(cli, [*args, "--batch-size", "2", "--max-steps", "7"])
    assert printed.exit_code == 0, printed.output
    assert answer["ok"] is True and answer["errors"] == [] and answer["steps"] == 7
    assert printed.output.rstrip("\n").endswith(answer["text"])


def test_a_bad_form_value_is_one_config_error_naming_the_flag(client):
    body = {"dataset": "stripes", "values": {"rank": "eight", "nme": "x"}}
    answer = client.post("/ui/api/train/preflight", json=body)
    assert answer.status_code == 422 and "unknown key 'nme'" in answer.json()["error"]
    body = {"dataset": "stripes", "values": {"name": "../evil"}}
    assert client.post("/ui/api/train/jobs", json=body).status_code == 400


def test_upload_creates_the_dataset_whole_or_not_at_all(client, root):
    red, blue = _png("red"), _png("blue")
    files = [
        {"name": "../../a b.png", "data": base64.b64encode(red).decode(), "caption": "a red square"},
        {"name": "C:\\x\\two.png", "data": base64.b64encode(blue).decode(), "caption": ""},
    ]
    answer = client.post("/ui/api/train/datasets", json={"name": "squares", "files": files})
    assert answer.status_code == 201, answer.text
    folder = root / "squares"
    assert sorted(os.listdir(folder)) == ["a_b.png", "a_b.txt", "two.png"]
    assert (folder / "a_b.png").read_bytes() == red and (folder / "two.png").read_bytes() == blue
    assert (folder / "a_b.txt").read_text() == "a red square\n"
    assert client.post("/ui/api/train/datasets", json={"name": "squares", "files": files}).status_code == 409
    broken = [*files, {"name": "c.png", "data": base64.b64encode(b"not an image").decode()}]
    answer = client.post("/ui/api/train/datasets", json={"name": "broken", "files": broken})
    assert answer.status_code == 400 and answer.json()["error"].startswith("c.png: not a readable image")
    for name in ("../up", "/abs", ".hidden"):
        assert client.post("/ui/api/train/datasets", json={"name": name, "files": files}).status_code == 400
    assert not (root / "broken").exists() and not list(root.glob(".*.tmp"))
    assert "squares" in client.get("/ui/api/train/datasets").json()["datasets"]


def test_past_runs_are_read_from_their_folders(client, engine):
    folder = engine.directories[0] / "old.run"
    log = TrainLog(folder, total_steps=3, start_step=0, progress=False)
    losses = [0.5, 0.25, 0.125]
    for step, loss in enumerate(losses, start=1):
        log.step(
            step,
            0,
            loss,
            1e-3,
            skipped=False,
            seconds=0.5,
            validation={"validation_loss": 0.3} if step == 2 else None,
        )
    log.write_curve()
    log.close()
    (folder / "plan.txt").write_text("plan\n  length      3 steps, 1 epoch(s) of 3 steps (given)\n")
    (folder / "samples").mkdir()
    (folder / "samples" / "step-000003.png").write_bytes(_png("green"))
    listed = client.get("/ui/api/runs").json()["runs"]
    assert [run["name"] for run in listed] == ["old"] and listed[0]["steps"] == 3
    detail = client.get("/ui/api/runs/old").json()
    assert [row["loss"] for row in detail["rows"]] == losses
    assert [row["validation_loss"] for row in detail["rows"]] == [None, 0.3, None]
    assert detail["samples"] == ["step-000003.png"] and detail["status"]["total_steps"] == 3
    assert detail["status"]["it_per_s"] == pytest.approx(2.0) and detail["status"]["eta_s"] == 0
    grid = client.get("/ui/api/runs/old/files/samples/step-000003.png")
    assert grid.status_code == 200 and grid.content == _png("green")
    assert client.get("/ui/api/runs/old/files/loss.png").content == (folder / "loss.png").read_bytes()
    for name in ("config.toml", "../old.run/loss.png", "samples/../loss.csv"):
        assert client.get(f"/ui/api/runs/old/files/{name}").status_code == 404
    assert client.get("/ui/api/runs/..%2Fx").status_code in (400, 404)
