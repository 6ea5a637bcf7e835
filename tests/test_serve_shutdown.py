"""Graceful shutdown of the real `difflora serve` (uvicorn in a subprocess, the embedded model): SIGTERM (or
SIGINT) during a render lets the render in flight and the queued request finish (200), refuses new requests (503)
while /health says "draining" and /ready is 503, and the process exits 0 within --shutdown-timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

SHUTDOWN_TIMEOUT = 40


def start_server(folder: Path, port: int, *flags: str) -> tuple[subprocess.Popen, Path]:
    command = [sys.executable, "-m", "difflora", "serve", "--port", str(port), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    log = folder / f"server-{port}.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT)
    return server, log


def wait_healthy(server: subprocess.Popen, log: Path, base: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, log.read_text()
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"not ready within {timeout} s:\n" + log.read_text()
        time.sleep(0.3)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.kill()
        server.wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_render_finishes_it_refuses_new_ones_and_exits_0(tmp_path, sig):
    import httpx

    from tests.test_serve import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server, log = start_server(tmp_path, port, "--batch-window-ms", "0",
                               "--shutdown-timeout", str(SHUTDOWN_TIMEOUT))  # fmt: skip
    try:
        wait_healthy(server, log, base)
        with ThreadPoolExecutor(2) as pool:
            # long enough to outlast the checks below on a loaded machine (12 steps at 32 px did not once)
            body = {"prompt": "a striped cat", "seed": 1, "steps": 50, "width": 64, "height": 64}
            in_flight = pool.submit(httpx.post, base + "/generate", json=body, timeout=120)
            wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["busy"])
            queued = pool.submit(httpx.post, base + "/generate", json={**body, "steps": 1}, timeout=120)
            wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["queued"] == 1)
            signalled = time.monotonic()
            server.send_signal(sig)
            wait_for(lambda: httpx.get(base + "/health", timeout=5).json()["status"] == "draining")
            refused = httpx.post(base + "/generate", json=body, timeout=30)
            ready = httpx.get(base + "/ready", timeout=5)
            assert httpx.get(base + "/health", timeout=5).json()["busy"], "the render ended before the check"
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
            assert refused.headers["retry-after"] and ready.status_code == 503
            for answer in (in_flight.result(), queued.result()):
                assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        code = server.wait(timeout=SHUTDOWN_TIMEOUT + 10)
        took = time.monotonic() - signalled
    finally:
        stop(server)
    assert code == 0, log.read_text()
    assert took < SHUTDOWN_TIMEOUT, took
    assert "Traceback" not in log.read_text(), log.read_text()
