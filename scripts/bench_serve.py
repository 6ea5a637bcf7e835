"""Serving throughput: `difflora serve` with its adapter cache, side by side with a naive server that reads
every request's adapters from disk and composes them from scratch (the same Engine, reload_each_request).

For each count of adapters on disk (synthetic: random A/B, rank --rank, on the UNet and text-encoder
attention projections) and each adapter-set churn (the share of requests that ask for a new random set of
--set-size adapters at new weights; the others repeat the previous request's set), four real uvicorn
servers on free loopback ports (threads of this process, each with a pipeline of its own: fused and
dynamic composition, each cached and naive) answer the same --requests PNG requests, after one warm-up.
Requests go round-robin over the servers, one at a time, so a change of load on a shared machine hits all
four alike. The cache holds --cache-adapters adapters, so with more on disk it evicts. Reported per server:
requests/s (1 / mean latency), p50/p95 latency, the cache's hit rate, mean compose and render time.

Bounded: --requests per cell, and --max-seconds for the whole run (cells not started by then are listed
as skipped). Loopback only; the script stops its servers itself.

    python scripts/bench_serve.py --requests 40 --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import uvicorn
from bench_generate import synthetic_adapter  # scripts/ is on sys.path when this file runs

from difflora.formats.native import save_adapter
from difflora.generation.pipeline import render
from difflora.models.loading import load_pipeline
from difflora.serving.app import create_app
from difflora.serving.cache import adapter_bytes
from difflora.serving.engine import Engine

PROMPT = "a blue square, striped"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread, until `stop()`."""

    def __init__(self, app) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmark server did not start within 30 s")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def next_spec(rng: random.Random, names: list[str], previous: str | None, churn: float, size: int) -> str:
    if previous is not None and rng.random() >= churn:
        return previous
    chosen = rng.sample(names, size)
    return ",".join(f"{name}:{rng.uniform(0.2, 1.0):.2f}" for name in chosen)


@dataclass
class Variant:
    """One server of a cell: a composition mode, cached or naive, on a pipeline of its own."""

    mode: str
    naive: bool
    pipe: object
    engine: Engine | None = None
    latencies: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.mode}-{'naive' if self.naive else 'cached'}"


def request_sequence(names: list[str], churn: float, args) -> list[str]:
    rng = random.Random(f"{len(names)}-{churn}")  # every server of a cell gets the same sequence
    specs: list[str] = []
    for _ in range(args.requests + 1):
        specs.append(next_spec(rng, names, specs[-1] if specs else None, churn, args.set_size))
    return specs


def run_cell(variants: list[Variant], directory: Path, names: list[str], churn: float, args) -> list[dict]:
    """Every variant answers the same request sequence; requests go round-robin across the variants (one
    at a time), so a change of load on the shared machine hits all of them alike."""
    specs = request_sequence(names, churn, args)
    cache_bytes = args.cache_adapters * args.adapter_bytes
    with ExitStack() as stack:
        clients = []
        for variant in variants:
            variant.engine = Engine(
                variant.pipe,
                adapter_dir=[str(directory)],
                cache_bytes=cache_bytes,
                mode=variant.mode,
                reload_each_request=variant.naive,
            )
            variant.latencies = []
            base = stack.enter_context(ServerThread(create_app(variant.engine)))
            clients.append(stack.enter_context(httpx.Client(base_url=base, timeout=120)))
        before = {}
        for index, spec in enumerate(specs):
            for variant, client in zip(variants, clients, strict=True):
                if index == 1:  # after the warm-up request
                    before[variant.key] = (variant.engine.cache.stats(), _sums(variant.engine))
                body = {"prompt": PROMPT, "adapters": spec, "seed": index, "steps": args.steps}
                sent = time.perf_counter()
                client.post("/generate", json=body).raise_for_status()
                if index:
                    variant.latencies.append(time.perf_counter() - sent)
    load = os.getloadavg()[0]
    return [
        _summary(variant, *before[variant.key], churn=churn, count=len(names), load=load)
        for variant in variants
    ]


def _sums(engine: Engine) -> tuple[float, float]:
    return engine.metrics.compose.total(), engine.metrics.render.total()


def _summary(variant: Variant, stats_before, sums_before, *, churn: float, count: int, load: float) -> dict:
    after, latencies = variant.engine.cache.stats(), variant.latencies
    hits, misses = after.hits - stats_before.hits, after.misses - stats_before.misses
    compose, rendering = (now - then for now, then in zip(_sums(variant.engine), sums_before, strict=True))
    return {
        "mode": variant.mode,
        "naive": variant.naive,
        "adapters": count,
        "churn": round(churn * 100),
        "requests": len(latencies),
        "rps": len(latencies) / sum(latencies),
        "p50": statistics.median(latencies),
        "p95": statistics.quantiles(latencies, n=20, method="inclusive")[18],
        "hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
        "evictions": after.evictions - stats_before.evictions,
        "compose_ms": 1000 * compose / len(latencies),
        "render_ms": 1000 * rendering / len(latencies),
        "load": load,
    }


def write_adapters(pipe, root: Path, count: int, rank: int) -> list[str]:
    names = [f"a{index:02d}" for index in range(count)]
    for index, name in enumerate(names):
        save_adapter(synthetic_adapter(pipe, index, rank), root / f"{name}.safetensors")
    return names


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [Variant(mode, naive, load_pipeline(None)) for mode in args.modes for naive in (False, True)]
    for variant in variants:  # warm-up: the first call pays kernel set-up
        render(variant.pipe, [PROMPT], seeds=[0], steps=args.steps)
    deadline = time.monotonic() + args.max_seconds
    cells, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        pipe = variants[0].pipe
        args.adapter_bytes = adapter_bytes(synthetic_adapter(pipe, 0, args.rank))
        for count in args.adapters:
            directory = Path(tmp) / f"n{count}"
            directory.mkdir()
            names = write_adapters(pipe, directory, count, args.rank)
            for churn in args.churn:
                if time.monotonic() > deadline:
                    skipped.append({"adapters": count, "churn": churn})
                    continue
                for cell in run_cell(variants, directory, names, churn / 100, args):
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
    return {"cells": cells, "skipped": skipped, "adapter_bytes": args.adapter_bytes}


def markdown(result: dict, args) -> str:
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; embedded model, 64x64, {args.steps} Euler steps; {args.requests} "
        f"requests per server per cell after one warm-up, round-robin over the {2 * len(args.modes)} servers; "
        f"{args.set_size} adapters per request (rank {args.rank}, {result['adapter_bytes'] / 2**20:.2f} MiB each); "
        f"cache room for {args.cache_adapters} adapters.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| mode | adapters on disk | churn | cached req/s | p50 s | p95 s | hit rate | compose ms | render ms "
        "| naive req/s | p50 s | p95 s | compose ms | cached / naive req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(c["mode"], c["adapters"], c["churn"], c["naive"]): c for c in result["cells"]}
    loads = []
    for count in args.adapters:
        for churn in args.churn:
            for mode in args.modes:
                cached, naive = (
                    by_key.get((mode, count, churn, False)),
                    by_key.get((mode, count, churn, True)),
                )
                if not cached or not naive:
                    lines.append(f"| {mode} | {count} | {churn}% | skipped (--max-seconds) |")
                    continue
                loads.append(cached["load"])
                lines.append(
                    f"| {mode} | {count} | {churn}% | {cached['rps']:.2f} | {cached['p50']:.3f} | "
                    f"{cached['p95']:.3f} | {cached['hit_rate']:.2f} | {cached['compose_ms']:.1f} | "
                    f"{cached['render_ms']:.0f} | {naive['rps']:.2f} | {naive['p50']:.3f} | {naive['p95']:.3f} | "
                    f"{naive['compose_ms']:.1f} | {cached['rps'] / naive['rps']:.2f} |"
                )
    lines += [
        "",
        "compose ms: finding, reading (a cache miss) and composing a request's adapters, mean per request; "
        "render ms: the denoising and decoding, mean per request.",
    ]
    if loads:
        lines.append(
            f"1-minute load average after each cell: {min(loads):.1f}-{max(loads):.1f} (2 cores, shared)."
        )
    return "\n".join(lines)


def main() -> None:
    def numbers(text: str) -> list[int]:
        return [int(item) for item in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=numbers, default=[8, 32], help="adapters on disk, e.g. 8,32")
    parser.add_argument(
        "--churn", type=numbers, default=[0, 50, 100], help="percent of requests with a new set"
    )
    parser.add_argument("--modes", type=lambda t: t.split(","), default=["fused", "dynamic"])
    parser.add_argument("--requests", type=int, default=40, help="timed requests per cell")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cache-adapters", type=int, default=16, help="cache size, in adapters")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop starting cells after this")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()
    if args.requests < 2 or args.set_size > min(args.adapters):
        parser.error("--requests must be at least 2 and --set-size at most the smallest --adapters")
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result, args))


if __name__ == "__main__":
    main()
