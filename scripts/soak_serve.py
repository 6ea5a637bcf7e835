"""A minute of load on `difflora serve`: 8 clients, each sending its next request as soon as the last is
answered, a different adapter set per request (mixed batches) or the same one, for --seconds; /health polled
every second meanwhile. Reports the server process's resident memory (VmRSS) after a warm-up minute's first
requests and after the load, the requests answered by status, the slowest /health answer and how many render
calls were mixed. The server is the batching one `difflora serve` runs (batch window 15 ms, max batch 8),
a uvicorn thread in this process over the embedded model.

    nice python scripts/soak_serve.py --seconds 60 --clients 8 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from bench_serve import ServerThread, write_adapters  # scripts/ is on sys.path when this file runs

from difflora.config.serve import ServeConfig
from difflora.models.loading import load_pipeline
from difflora.serving.app import create_app
from difflora.serving.engine import Engine
from difflora.serving.scheduler import QueueOptions


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_loop(
    base: str, index: int, stop: float, names: list[str], args, statuses: collections.Counter
) -> None:
    sent = 0
    with httpx.Client(base_url=base, timeout=600) as client:
        while time.monotonic() < stop:
            spec = (
                f"{names[0]}:0.6,{names[1]}:0.4" if args.mix == "same" else f"{names[(index + sent) % 8]}:0.7"
            )
            body = {
                "prompt": f"a blue square {index} {sent}",
                "adapters": spec,
                "seed": sent,
                "steps": args.steps,
            }
            statuses[client.post("/generate", json=body).status_code] += 1
            sent += 1


def health_loop(base: str, stop: float, slowest: list[float]) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        while time.monotonic() < stop:
            sent = time.perf_counter()
            assert client.get("/health").json()["status"] == "ok"
            slowest[0] = max(slowest[0], time.perf_counter() - sent)
            time.sleep(1.0)


def load(base: str, names: list[str], args, seconds: float) -> tuple[collections.Counter, float]:
    statuses: collections.Counter = collections.Counter()
    slowest = [0.0]
    stop = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(base, i, stop, names, args, statuses))
        for i in range(args.clients)
    ]
    threads.append(threading.Thread(target=health_loop, args=(base, stop, slowest)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, slowest[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warm-up", type=float, default=20, help="seconds of the same load before measuring")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mix", choices=("same", "different"), default="different")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(None)
    with tempfile.TemporaryDirectory(prefix="soak_serve_") as tmp:
        names = write_adapters(pipe, Path(tmp), 8, 8)
        engine = Engine(pipe, adapter_dir=[tmp])
        queue = QueueOptions(max_queue=ServeConfig.max_queue, batch_window_ms=ServeConfig.batch_window_ms,
                             max_batch=ServeConfig.max_batch)  # fmt: skip
        with ServerThread(create_app(engine, queue=queue)) as base:
            load(
                base, names, args, args.warm_up
            )  # caches filled, kernels set up, the heap at its working size
            before = resident_mib()
            statuses, slowest = load(base, names, args, args.seconds)
            after = resident_mib()
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "seconds": args.seconds, "clients": args.clients, "mix": args.mix, "steps": args.steps,
        "statuses": dict(statuses), "rss_mib_before": round(before, 1), "rss_mib_after": round(after, 1),
        "slowest_health_s": round(slowest, 3),
        "mixed_calls": engine.metrics.batches.value(mode="mixed"),
        "fused_calls": engine.metrics.batches.value(mode="fused"),
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    return 0 if set(statuses) == {200} else 1


if __name__ == "__main__":
    sys.exit(main())
