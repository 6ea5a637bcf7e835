"""uvicorn, with a graceful shutdown that drains the queue first.

uvicorn's own SIGTERM/SIGINT handling closes the listening socket at once (a new request gets a refused
connection, not a 503 a load balancer can read), waits for open connections, then re-raises the signal
after its shutdown, so the process dies of it instead of exiting 0. DrainingServer keeps uvicorn's loop and
lifespan and changes only the signal handler: the first signal drains the scheduler (new requests 503,
/health "draining", /ready 503, the batch in flight and the queued requests that fit within
`shutdown_timeout` render, the rest 503), then lets uvicorn shut down with the time left; a second SIGINT
forces the exit, as uvicorn's does. The process then exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

from difflora.serving.scheduler import Scheduler

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.scheduler, self.shutdown_timeout = scheduler, shutdown_timeout
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # never recorded in uvicorn's _captured_signals: it would re-raise the signal after shutting down
        if self._drainer is not None:
            if sig == signal.SIGINT:  # a second Ctrl+C: stop now
                self.should_exit = self.force_exit = True
            return
        logger.warning("signal %d: draining (up to %.0f s, --shutdown-timeout)", sig, self.shutdown_timeout)
        self.scheduler.drain(self.shutdown_timeout)
        self._drainer = threading.Thread(target=self._drain, name="difflora-drain", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        start = time.perf_counter()
        self.scheduler.wait_idle(
            self.shutdown_timeout + 1.0
        )  # the scheduler refuses the rest at the deadline
        left = self.shutdown_timeout - (time.perf_counter() - start)
        self.config.timeout_graceful_shutdown = max(1, int(left))  # for answers still being sent
        self.should_exit = True


def run_server(app: Any, scheduler: Scheduler, *, host: str, port: int, shutdown_timeout: float) -> None:
    """Serve `app` until SIGTERM or SIGINT, then drain `scheduler` and return (exit status 0)."""
    # uvicorn's start-up, shut-down and per-request lines would repeat what `difflora serve` says on start
    # and what GET /metrics counts; its warnings and errors still show
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning", access_log=False)
    DrainingServer(config, scheduler, shutdown_timeout).run()
