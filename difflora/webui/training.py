"""The web UI's training routes, under /ui/api on the `difflora serve` app (same process, same token):

    GET  /train/form                  the form: TrainConfig's fields (difflora.webui.forms)
    GET  /train/datasets              the dataset folders under --data-root
    POST /train/datasets              a new dataset from uploaded images and captions (webui.uploads)
    POST /train/preflight             `difflora check`'s report on {dataset, values}
    GET  /train/jobs                  the queue and its policy; POST: queue a run of {dataset, values}
    GET  /train/jobs/{id}             one job with its progress; .../output: the end of its console output
    POST /train/jobs/{id}/cancel      stop at the next step, leaving a checkpoint
    POST /train/jobs/{id}/resume      queue the run again with --resume
    GET  /train/jobs/{id}/events      server-sent events: progress, sample, state, end
    GET  /runs, /runs/{name}, /runs/{name}/files/{file}  past runs in the adapter folders

Without --data-root every /ui/api/train route answers 409 with one line saying how to turn training on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from difflora.serving.engine import Engine
from difflora.webui.forms import form_schema, train_config
from difflora.webui.jobs import ACTIVE, POLICY, Job, JobQueue
from difflora.webui.paths import WebUIError, datasets, existing, require_root
from difflora.webui.progress import snapshot
from difflora.webui.routes import API_PREFIX
from difflora.webui.runs import run_detail, run_file, run_folder, run_list
from difflora.webui.uploads import UploadBody, create_dataset

EVENT_SECONDS = 0.25  # how often the event stream looks at the run folder
JOBS_FOLDER = ".difflora-jobs"  # under --data-root; hidden, so never listed as a dataset


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str
    values: dict[str, Any] = {}


class Training:
    """What the routes share: the data root (None: training off), the adapter folders and the queue."""

    def __init__(self, engine: Engine, data_root: Path | None) -> None:
        self.root = data_root
        self.directories = [directory.expanduser().resolve() for directory in engine.directories]
        self.model = engine.identity.name  # the base the server composes adapters on, named on the page
        self._queue: JobQueue | None = None
        self._starting = threading.Lock()

    @property
    def queue(self) -> JobQueue:
        root = require_root(self.root)
        with self._starting:  # routes run on a thread pool: two first requests must share one queue
            if self._queue is None:  # the worker thread starts with the first use
                self._queue = JobQueue(root / JOBS_FOLDER)
        return self._queue

    def config(self, body: RunBody, *, resume: bool = False):
        root = require_root(self.root)
        dataset = existing(root, body.dataset, what="dataset", folder=True)
        return train_config(
            body.values, dataset=dataset, output_dir=self.directories[0], root=root, resume=resume
        )

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()


def install_training(app: FastAPI, engine: Engine, data_root: Path | None) -> Training:
    """Add the training and runs routes to `app`; the Training is `app.state.training`."""
    training = Training(engine, data_root)
    app.state.training = training

    @app.exception_handler(WebUIError)
    async def refused(request: Request, error: WebUIError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    router = APIRouter(prefix=API_PREFIX)
    _add_train_routes(router, training)
    _add_job_routes(router, training)
    _add_run_routes(router, training)
    app.include_router(router)
    return training


def _add_train_routes(app: APIRouter, training: Training) -> None:
    @app.get("/train/form")
    def form() -> dict[str, Any]:
        require_root(training.root)
        return {
            "fields": form_schema(),
            "output_dir": str(training.directories[0]),
            "policy": POLICY,
            "server_model": training.model,
        }

    @app.get("/train/datasets")
    def dataset_list() -> dict[str, Any]:
        return {"datasets": datasets(require_root(training.root))}

    @app.post("/train/datasets", status_code=201)
    def upload(body: UploadBody) -> dict[str, Any]:
        folder = create_dataset(require_root(training.root), body)
        return {"dataset": folder.name, "files": sorted(path.name for path in folder.iterdir())}

    @app.post("/train/preflight")
    def preflight(body: RunBody) -> dict[str, Any]:
        from difflora.training.check import check_folder  # reads the model's config files, no weights

        report = check_folder(training.config(body))
        plan = report.plan
        return {
            "ok": report.ok,
            "errors": report.errors,
            "note": report.model_note,
            "steps": plan.max_steps if plan else None,
            "text": report.render(),
        }


def _add_job_routes(app: APIRouter, training: Training) -> None:
    @app.get("/train/jobs")
    def jobs() -> dict[str, Any]:
        return {"policy": POLICY, "jobs": [job.summary() for job in training.queue.jobs]}

    @app.post("/train/jobs", status_code=201)
    def start(body: RunBody) -> dict[str, Any]:
        return training.queue.submit(training.config(body), dataset=body.dataset).summary()

    @app.get("/train/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        found = training.queue.get(job_id)
        return {**found.summary(), "progress": snapshot(found.run_dir).status()}

    @app.get("/train/jobs/{job_id}/output")
    def output(job_id: str) -> PlainTextResponse:
        return PlainTextResponse(training.queue.output(job_id))

    @app.post("/train/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        return training.queue.cancel(job_id).summary()

    @app.post("/train/jobs/{job_id}/resume", status_code=201)
    def resume(job_id: str) -> dict[str, Any]:
        old = training.queue.get(job_id)
        if not old.summary()["resumable"]:
            raise WebUIError(f"Job {job_id} is {old.state} with no checkpoint to resume from.")
        config = dataclasses.replace(old.config, resume=True)
        return training.queue.submit(config, dataset=old.dataset, resume=True).summary()

    @app.get("/train/jobs/{job_id}/events")
    def events(job_id: str) -> StreamingResponse:
        found = training.queue.get(job_id)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(_events(found), media_type="text/event-stream", headers=headers)


def _add_run_routes(app: APIRouter, training: Training) -> None:
    @app.get("/runs")
    def runs() -> dict[str, Any]:
        return {"runs": run_list(training.directories)}

    @app.get("/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        return run_detail(run_folder(training.directories, name))

    @app.get("/runs/{name}/files/{file:path}")
    def file(name: str, file: str) -> FileResponse:
        return FileResponse(run_file(run_folder(training.directories, name), file), media_type="image/png")


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _events(job: Job) -> AsyncIterator[str]:
    """The job's progress as it happens: `progress` (new loss rows with step, loss, it/s, ETA; `reset`
    when a resumed run dropped rows past its checkpoint), `sample` per new grid, `state` per change of
    state, and `end` once the job has ended and everything it wrote was sent."""
    last_step, samples, state = 0, set(), None
    while True:
        ended = job.state not in ACTIVE  # read before the folder: nothing written after it is missed
        current = await run_in_threadpool(snapshot, job.run_dir)
        reset = bool(current.rows) and current.rows[-1]["step"] < last_step
        rows = [row for row in current.rows if reset or row["step"] > last_step]
        if rows:
            last_step = rows[-1]["step"]
            yield _event("progress", {"rows": rows, "reset": reset, **current.status()})
        for grid in current.samples:
            if grid not in samples:
                samples.add(grid)
                yield _event("sample", {"file": grid, "step": int(grid[5:11]), "run": job.adapter.stem})
        if job.state != state:
            state = job.state
            yield _event("state", job.summary())
        if ended:
            yield _event("end", job.summary())
            return
        await asyncio.sleep(EVENT_SECONDS)
