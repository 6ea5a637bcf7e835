"""Training from the web UI: a queued job trains in a child process, its progress streams as server-sent
events read from the run folder, the finished adapter is in the server's library; a cancelled job stops at
a checkpoint that a resumed job continues to the end. The tiny saved model of tests/support/training.py at
16 px, one thread: seconds per run."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from difflora.serving.app import create_app
from difflora.serving.engine import Engine
from difflora.training.log import read_loss_csv
from tests.support.training import make_workspace

pytestmark = pytest.mark.slow

VALUES = {
    "model": "model",  # under the data root, like the dataset
    "resolution": 16,
    "batch_size": 4,
    "save_every": 2,
    "sample_every": 3,
    "sample_steps": 2,
    "sample_seeds": [1],
    "learning_rate": 0.01,
    "num_threads": 1,
}


@pytest.fixture
def client(tmp_path, monkeypatch):
    from difflora.models.loading import load_pipeline

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = make_workspace(tmp_path / "root")
    engine = Engine(load_pipeline(None), adapter_dir=[str(tmp_path / "adapters")])
    app = create_app(engine, data_root=root)
    with TestClient(app) as client:
        yield client
    app.state.training.close()


def events(client: TestClient, job_id: str) -> list[tuple[str, dict]]:
    """The job's event stream, read to its end."""
    found, kind = [], None
    with client.stream("GET", f"/ui/api/train/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((kind, json.loads(line.removeprefix("data: "))))
    return found


def wait_for(client: TestClient, job_id: str, condition, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/ui/api/train/jobs/{job_id}").json()
        if condition(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {job}")


def test_a_job_streams_its_progress_and_its_adapter_joins_the_library(client, tmp_path):
    body = {"dataset": "stripes", "values": {**VALUES, "max_steps": 6}}
    job = client.post("/ui/api/train/jobs", json=body).json()
    assert job["state"] in ("queued", "running") and job["name"] == "stripes"
    seen = events(client, job["id"])
    kinds = [kind for kind, _ in seen]
    assert kinds[-1] == "end" and seen[-1][1]["state"] == "finished", seen[-1]
    rows = [row for kind, data in seen if kind == "progress" for row in data["rows"]]
    logged = read_loss_csv(tmp_path / "adapters" / "stripes.run" / "loss.csv")
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert [row["loss"] for row in rows] == [float(row["loss"]) for row in logged]
    last = [data for kind, data in seen if kind == "progress"][-1]
    assert last["step"] == 6 and last["total_steps"] == 6 and last["eta_s"] == 0 and last["it_per_s"] > 0
    assert [data["step"] for kind, data in seen if kind == "sample"] == [3, 6]
    assert [data["state"] for kind, data in seen if kind == "state"][-1] == "finished"
    available = {card["name"] for card in client.get("/ui/api/adapters").json()["adapters"]}
    assert "stripes" in available
    assert client.get("/ui/api/runs/stripes").json()["adapter"] is True


def test_a_cancelled_job_leaves_a_checkpoint_that_resuming_finishes(client, tmp_path):
    body = {"dataset": "stripes", "values": {**VALUES, "max_steps": 20, "name": "long"}}
    job = client.post("/ui/api/train/jobs", json=body).json()
    second = client.post(
        "/ui/api/train/jobs", json={"dataset": "stripes", "values": {**VALUES, "max_steps": 2}}
    ).json()
    assert client.get(f"/ui/api/train/jobs/{second['id']}").json()["state"] == "queued"  # one run at a time
    cancelled = client.post(
        f"/ui/api/train/jobs/{second['id']}/cancel"
    ).json()  # leaves the queue, never runs
    assert cancelled["state"] == "cancelled" and cancelled["started"] is None
    wait_for(client, job["id"], lambda j: (j["checkpoint_step"] or 0) >= 2)
    assert client.post(f"/ui/api/train/jobs/{job['id']}/cancel").json()["state"] == "cancelling"
    stopped = wait_for(client, job["id"], lambda j: j["state"] != "cancelling")
    assert stopped["state"] == "cancelled" and stopped["resumable"], stopped
    step = stopped["checkpoint_step"]
    assert 2 <= step < 20 and f"(step {step})" in stopped["message"] and "--resume" in stopped["message"]
    run = tmp_path / "adapters" / "long.run"
    assert not (tmp_path / "adapters" / "long.safetensors").exists() and (run / "checkpoints").is_dir()
    assert client.post(f"/ui/api/train/jobs/{job['id']}/cancel").status_code == 409
    resumed = client.post(f"/ui/api/train/jobs/{job['id']}/resume").json()
    assert resumed["resume"] is True
    done = wait_for(client, resumed["id"], lambda j: j["state"] not in ("queued", "running"))
    assert done["state"] == "finished", done
    steps = [int(row["step"]) for row in read_loss_csv(run / "loss.csv")]
    assert steps == list(range(1, 21))  # every step once: the resumed run continued the checkpoint
    assert (tmp_path / "adapters" / "long.safetensors").is_file()
    log = client.get(f"/ui/api/train/jobs/{resumed['id']}/output").text
    assert f"(step {step} of 20)" in log and "resuming from" in log  # not a fresh start
