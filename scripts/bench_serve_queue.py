"""`difflora serve` under concurrent load: the one-at-a-time server (--batch-window-ms 0) against the batching
one (--batch-window-ms W, --max-batch 8), at 1, 4 and 8 concurrent clients, with two request mixes: every
request the same adapter set, or a different set per request (one of 8 adapters, round-robin).

Two real uvicorn servers on loopback (threads of this process, each with a pipeline of its own: the embedded
model); each cell sends --requests PNG requests (each its own prompt and seed) from C client threads, each
client sending its next request as soon as the previous one is answered. Reported per cell: requests/s
(requests / wall time), p50/p95 latency, and the mean images per render call. Cells alternate between the two
servers, so a change of load on a shared machine hits both alike.

Bounded: --requests per cell, --max-seconds for the whole run (cells not started by then are listed as
skipped). Loopback only; the script stops its servers itself.

    nice python scripts/bench_serve_queue.py --requests 16 --steps 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from bench_serve import ServerThread, write_adapters  # scripts/ is on sys.path when this file runs

from difflora.generation.pipeline import render
from difflora.models.loading import load_pipeline
from difflora.serving.app import create_app
from difflora.serving.engine import Engine
from difflora.serving.scheduler import QueueOptions

PROMPT = "a blue square, striped"


def spec_for(mix: str, index: int, names: list[str]) -> str:
    return f"{names[0]}:0.6,{names[1]}:0.4" if mix == "same" else f"{names[index % len(names)]}:0.7"


def run_cell(base: str, engine: Engine, clients: int, mix: str, names: list[str], args) -> dict:
    """`args.requests` requests from `clients` threads against the server at `base`."""
    batches_before = (engine.metrics.batch.count(), engine.metrics.batch.total())

    def one(index: int) -> float:
        body = {"prompt": f"{PROMPT} {index}", "adapters": spec_for(mix, index, names), "seed": index,
                "steps": args.steps}  # fmt: skip
        sent = time.perf_counter()
        with httpx.Client(base_url=base, timeout=600) as client:
            client.post("/generate", json=body).raise_for_status()
        return time.perf_counter() - sent

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - start
    calls = engine.metrics.batch.count() - batches_before[0]
    images = engine.metrics.batch.total() - batches_before[1]
    return {
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": statistics.quantiles(latencies, n=20, method="inclusive")[18],
        "per_call": images / calls if calls else float("nan"),
        "load": os.getloadavg()[0],
    }


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = {"one-at-a-time": 0.0, "batched": args.window_ms}
    pipes = {name: load_pipeline(None) for name in windows}
    for pipe in pipes.values():  # warm-up: the first call pays kernel set-up
        render(pipe, [PROMPT], seeds=[0], steps=args.steps)
    deadline = time.monotonic() + args.max_seconds
    cells: dict[tuple[str, int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_queue_") as tmp:
        names = write_adapters(pipes["batched"], Path(tmp), 8, args.rank)
        engines = {name: Engine(pipes[name], adapter_dir=[tmp]) for name in windows}
        apps = {}
        for name, window in windows.items():
            queue = QueueOptions(max_queue=256, batch_window_ms=window, max_batch=args.max_batch)
            apps[name] = create_app(engines[name], queue=queue)
        with ServerThread(apps["one-at-a-time"]) as solo_base, ServerThread(apps["batched"]) as batched_base:
            bases = {"one-at-a-time": solo_base, "batched": batched_base}
            for clients in args.clients:
                for mix in ("same", "different"):
                    for name in windows:
                        if time.monotonic() > deadline:
                            continue
                        cell = run_cell(bases[name], engines[name], clients, mix, names, args)
                        cells[(name, clients, mix)] = cell
                        print(name, clients, mix, cell, file=sys.stderr, flush=True)
    return cells


def markdown(cells: dict, args) -> str:
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; embedded model, 64x64, {args.steps} Euler "
        f"steps, fused mode; {args.requests} requests per cell, each with its own prompt and seed; batched: "
        f"--batch-window-ms {args.window_ms:g} --max-batch {args.max_batch}.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| clients | mix | one-at-a-time req/s | p50 s | p95 s | batched req/s | p50 s | p95 s | images/call "
        "| batched / one-at-a-time req/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for clients in args.clients:
        for mix in ("same", "different"):
            solo, batched = cells.get(("one-at-a-time", clients, mix)), cells.get(("batched", clients, mix))
            if not solo or not batched:
                lines.append(f"| {clients} | {mix} | skipped (--max-seconds) |")
                continue
            lines.append(
                f"| {clients} | {mix} set | {solo['rps']:.2f} | {solo['p50']:.2f} | {solo['p95']:.2f} | "
                f"{batched['rps']:.2f} | {batched['p50']:.2f} | {batched['p95']:.2f} | "
                f"{batched['per_call']:.1f} | {batched['rps'] / solo['rps']:.2f} |"
            )
    loads = [cell["load"] for cell in cells.values()]
    if loads:
        lines.append(f"\n1-minute load average after each cell: {min(loads):.1f}-{max(loads):.1f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per cell")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--window-ms", type=float, default=15.0, help="the batched server's --batch-window-ms"
    )
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop starting cells after this")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(markdown(run(args), args))


if __name__ == "__main__":
    main()
