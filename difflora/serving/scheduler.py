"""The bounded queue in front of the model, and the one thread that renders from it.

A request is checked (Engine.prepare: limits, adapter names) before it is queued, so a bad one is answered
4xx at once and never joins a batch. Past `max_queue` waiting, a request is refused at once (503 with
Retry-After); one still waiting at its deadline is answered 504 and leaves the queue, as does one whose
client went away (the route withdraws it). The scheduler thread takes the oldest request and, within the
batch window, every waiting request with the same Engine.batch_key, up to `max_batch` images, and renders
them with one Engine.render_group call: the model is used by this one thread (Engine's lock also guards it
against direct Engine.generate callers).

Draining (SIGTERM, SIGINT, the app's shutdown): new requests are refused (503), the batch in flight
finishes, queued requests render while they are expected to finish before the drain's deadline (from the
last batch's time per image) and are refused (503) after it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from difflora.config.serve import ServeConfig
from difflora.errors import DiffloraError
from difflora.serving.engine import Engine, Result, Ticket

logger = logging.getLogger(__name__)


class UnavailableError(DiffloraError):
    """The server cannot take the request now (503): its queue is full, or it is shutting down."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeoutError(DiffloraError):
    """The request was not started before its deadline (504)."""


@dataclass(frozen=True)
class QueueOptions:
    """The queue's knobs (ServeConfig's fields of the same names). The batch window is off unless asked
    for: the library default renders each request alone, exactly as `difflora generate`; `difflora serve`
    turns it on (ServeConfig.batch_window_ms)."""

    max_queue: int = ServeConfig.max_queue
    request_timeout: float = ServeConfig.request_timeout
    batch_window_ms: float = 0.0
    max_batch: int = ServeConfig.max_batch
    shutdown_timeout: float = ServeConfig.shutdown_timeout

    @classmethod
    def from_config(cls, config: ServeConfig) -> QueueOptions:
        return cls(config.max_queue, config.request_timeout, config.batch_window_ms, config.max_batch,
                   config.shutdown_timeout)  # fmt: skip


@dataclass(eq=False)
class Job:
    ticket: Ticket
    key: Hashable
    deadline: float  # perf_counter time by which it must have started
    future: Future[Result] = field(default_factory=Future)


class Scheduler:
    """`submit` queues a prepared ticket and returns its Job, whose future the scheduler thread resolves
    with the Result (or the render's error). The thread starts on the first submit."""

    def __init__(self, engine: Engine, options: QueueOptions | None = None) -> None:
        self.engine, self.options = engine, options or QueueOptions()
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting, self._stopping = True, False
        self._drain_deadline = math.inf
        self._in_flight = 0
        self._per_image = (
            0.0  # seconds per image of the last batch: what a queued request is expected to take
        )

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def draining(self) -> bool:
        return not self._accepting

    def submit(self, ticket: Ticket) -> Job:
        with self._cond:
            if not self._accepting:
                self.engine.metrics.rejected.inc(reason="draining")
                raise UnavailableError("The server is shutting down: send the request to another replica.", 5)
            if len(self._waiting) >= self.options.max_queue:
                self.engine.metrics.rejected.inc(reason="queue_full")
                raise UnavailableError(
                    f"The server's queue is full ({self.options.max_queue} waiting, --max-queue): retry "
                    "after the time in the Retry-After header.",
                    self._retry_after(),
                )
            job = Job(ticket, self.engine.batch_key(ticket), ticket.arrived + self.options.request_timeout)
            self._waiting.append(job)
            self.engine.metrics.depth.inc()
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="difflora-scheduler", daemon=True)
                self._thread.start()
        return job

    def withdraw(self, job: Job, reason: str) -> bool:
        """Take `job` out of the queue if it has not started (its deadline passed, its client left):
        True when it will never render, False when it is rendering or done."""
        if not job.future.cancel():
            return False
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.engine.metrics.depth.dec()
        self.engine.metrics.rejected.inc(reason=reason)
        return True

    def drain(self, timeout: float) -> None:
        """Stop accepting; queued requests render while they fit within `timeout` seconds, then get 503."""
        with self._cond:
            if self._accepting:
                logger.info("draining: %d queued, %.1f s to finish them", len(self._waiting), timeout)
            self._accepting = False
            self._drain_deadline = min(self._drain_deadline, time.perf_counter() + timeout)
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or rendering; True if it came within `timeout` seconds."""
        end = time.perf_counter() + timeout
        with self._cond:
            while self._waiting or self._in_flight:
                left = end - time.perf_counter()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Drain (within `timeout`, default the shutdown timeout), then stop the thread. True if it stopped."""
        timeout = self.options.shutdown_timeout if timeout is None else timeout
        self.drain(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout + 1.0)
            return not thread.is_alive()
        return True

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            if jobs:
                self._render(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The next batch to render (empty when all its jobs were withdrawn meanwhile); None to stop."""
        with self._cond:
            while not self._waiting:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            first = self._waiting[0]
            close = first.ticket.arrived + self.options.batch_window_ms / 1000
            while self._accepting and self._alike(first) < self.options.max_batch:
                left = close - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = self._take(first) if first in self._waiting else []  # withdrawn during the window
            self._in_flight = len(jobs)
        return self._start(jobs)

    def _alike(self, first: Job) -> int:
        return sum(job.ticket.images for job in self._waiting if job.key == first.key)

    def _take(self, first: Job) -> list[Job]:
        """`first` and the waiting jobs with its key, in order, up to max_batch images (first always)."""
        jobs, images = [first], first.ticket.images
        if self.options.batch_window_ms:  # else batching is off: one request at a time, in arrival order
            for job in list(self._waiting)[1:]:
                if job.key == first.key and images + job.ticket.images <= self.options.max_batch:
                    jobs.append(job)
                    images += job.ticket.images
        for job in jobs:
            self._waiting.remove(job)
            self.engine.metrics.depth.dec()
        return jobs

    def _start(self, jobs: list[Job]) -> list[Job]:
        """The jobs that start now: not withdrawn, not past their deadline, and (draining) expected to finish
        before the drain's deadline; the others are answered."""
        now, started = time.perf_counter(), []
        expected = now + self._per_image * sum(job.ticket.images for job in jobs)
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # withdrawn: its route has answered
            if now > job.deadline:
                self.engine.metrics.rejected.inc(reason="timeout")
                job.future.set_exception(_timeout(self.options.request_timeout))
            elif not self._accepting and expected > self._drain_deadline:
                self.engine.metrics.rejected.inc(reason="draining")
                job.future.set_exception(UnavailableError("The server shut down before this request's turn: "
                                                          "send it to another replica.", 5))  # fmt: skip
            else:
                started.append(job)
        if not started:
            self._done()
        return started

    def _render(self, jobs: list[Job]) -> None:
        images = sum(job.ticket.images for job in jobs)
        self.engine.metrics.batch.observe(images)
        start = time.perf_counter()
        try:
            results = self.engine.render_group([job.ticket for job in jobs])
        except Exception as error:  # the client's (a DiffloraError) or a bug: each request answers it
            for job in jobs:
                job.future.set_exception(error)
        else:
            for job, result in zip(jobs, results, strict=True):
                job.future.set_result(result)
        finally:
            self._per_image = (time.perf_counter() - start) / images
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._in_flight = 0
            self._cond.notify_all()

    def _retry_after(self) -> int:
        """Seconds until the queue has room, roughly: one batch's time."""
        return max(1, math.ceil(self._per_image * self.options.max_batch))


def _timeout(seconds: float) -> QueueTimeoutError:
    return QueueTimeoutError(
        f"The request waited {seconds:g} s (--request-timeout) without its turn: the server is busy; retry "
        "later or with a longer --request-timeout."
    )
