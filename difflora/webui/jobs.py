"""The training queue of the web UI: one run at a time, each in a child process (`python -m difflora train
--config FILE`), so a run's memory is its own and cancelling is SIGINT, which the trainer turns into a
checkpoint at the next step boundary (`--resume` continues it).

Jobs wait in order; a worker thread starts the oldest once the running one has ended. Generation requests
are not queued behind training: the server keeps answering them, its model and the run sharing the device
(POLICY, shown on the Training page and in GET /train/jobs)."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflora.config import to_toml
from difflora.config.train import TrainConfig
from difflora.safe_io import write_atomic
from difflora.training.checkpoint import latest_checkpoint
from difflora.training.lock import run_paths
from difflora.webui.paths import ConflictError, NotFoundError

logger = logging.getLogger(__name__)

POLICY = (
    "One training run at a time; the others wait in this queue. Generation requests keep being served "
    "while a run trains: they share the device with it, so both are slower."
)
ACTIVE = ("queued", "running", "cancelling")
# `difflora train` with Python's own SIGINT handler: a server started where SIGINT is ignored (nohup, a
# background job) would pass that on, and the cancel would do nothing
CHILD = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from difflora.cli import main; main()"
)
INTERRUPTED = 130
OUTPUT_BYTES = (
    64 * 1024
)  # the end of a job's console output that GET .../output returns  # the exit status of a run stopped by SIGINT (difflora.errors.Interrupted)


@dataclass
class Job:
    """One run to train. `state`: queued, running, cancelling, finished, failed or cancelled."""

    id: str
    config: TrainConfig
    folder: Path  # the job's own folder: config.toml and the run's console output
    dataset: str
    resume: bool = False
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    message: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return run_paths(self.config).run_dir

    @property
    def adapter(self) -> Path:
        return run_paths(self.config).adapter

    def summary(self) -> dict[str, Any]:
        checkpoint = latest_checkpoint(run_paths(self.config).checkpoints)
        return {
            "id": self.id,
            "name": self.adapter.stem,
            "dataset": self.dataset,
            "state": self.state,
            "resume": self.resume,
            "created": self.created,
            "started": self.started,
            "ended": self.ended,
            "returncode": self.returncode,
            "message": self.message,
            "run": self.run_dir.name,
            "adapter": self.adapter.name if self.adapter.is_file() else None,
            "checkpoint_step": checkpoint.step if checkpoint else None,
            "resumable": self.state in ("cancelled", "failed") and checkpoint is not None,
        }


class JobQueue:
    """Jobs in order, one running; `close()` stops the worker and interrupts the running child."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="difflora-training", daemon=True)
        self._worker.start()
        atexit.register(self.close)

    def submit(self, config: TrainConfig, *, dataset: str, resume: bool = False) -> Job:
        """Queue a run of `config`; refused while a job of the same adapter is queued or running."""
        with self._changed:
            target = run_paths(config).adapter
            if any(job.adapter == target and job.state in ACTIVE for job in self.jobs):
                raise ConflictError(
                    f"A run of {target.stem!r} is already queued or running: wait or cancel it."
                )
            job_id = f"{int(time.time())}-{next(self._ids)}"  # unique across the server's restarts too
            job = Job(job_id, config, self.folder / job_id, dataset, resume)
            job.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(job.folder / "config.toml", to_toml(config, section="train").encode())
            self.jobs.append(job)
            self._changed.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        found = next((job for job in self.jobs if job.id == job_id), None)
        if found is None:
            raise NotFoundError(f"No training job {job_id!r}: GET /train/jobs lists them.")
        return found

    def cancel(self, job_id: str) -> Job:
        """A queued job leaves the queue; a running one is sent SIGINT and stops at its next step,
        writing a checkpoint that a resumed run continues."""
        with self._changed:
            job = self.get(job_id)
            if job.state == "queued":
                job.state, job.ended, job.message = "cancelled", time.time(), "Cancelled before it started."
            elif job.state == "running" and job.process is not None:
                job.state = "cancelling"
                job.process.send_signal(signal.SIGINT)
            else:
                raise ConflictError(
                    f"Job {job_id} is {job.state}: only a queued or running job can be cancelled."
                )
            self._changed.notify_all()
        return job

    def output(self, job_id: str) -> str:
        """The end of the job's console output (its child's stdout and stderr): what a failed run said."""
        path = self.get(job_id).folder / "output.log"
        if not path.is_file():
            return ""
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - OUTPUT_BYTES))
            return handle.read().decode(errors="replace")

    def wait(self, job: Job, timeout: float) -> bool:
        """Until `job` has ended (True) or `timeout` seconds passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: job.state not in ACTIVE, timeout)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            running = [job for job in self.jobs if job.state in ("running", "cancelling")]
            for job in running:
                if job.process is not None and job.process.poll() is None:
                    job.process.send_signal(signal.SIGINT)
            self._changed.notify_all()
        for job in running:
            if job.process is not None:
                try:
                    job.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    job.process.kill()

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or self._next() is not None)
                job = self._next()
                if self._closed or job is None:
                    return
                job.state, job.started = "running", time.time()
                job.process = _start(job)
                self._changed.notify_all()
            returncode = job.process.wait()
            with self._changed:
                _finish(job, returncode)
                self._changed.notify_all()

    def _next(self) -> Job | None:
        return next((job for job in self.jobs if job.state == "queued"), None)


def _start(job: Job) -> subprocess.Popen:
    """The child process training `job` (its own session: a Ctrl-C at the server's terminal reaches it
    only through close())."""
    command = [sys.executable, "-c", CHILD, "train", "--config", str(job.folder / "config.toml")]
    log = open(job.folder / "output.log", "wb")  # noqa: SIM115 - the child holds it; closed below
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        log.close()


def _finish(job: Job, returncode: int) -> None:
    job.returncode, job.ended = returncode, time.time()
    lines = (job.folder / "output.log").read_text(errors="replace").strip().splitlines()
    last = lines[-1] if lines else ""
    if returncode == 0:
        job.state, job.message = "finished", f"Adapter {job.adapter.name} written."
    elif returncode == INTERRUPTED and job.state == "cancelling":
        job.state, job.message = "cancelled", last.removeprefix("Error: ")
    else:
        job.state, job.message = "failed", last.removeprefix("Error: ") or f"exit status {returncode}"
    logger.info("training job %s (%s): %s", job.id, job.adapter.stem, job.state)
