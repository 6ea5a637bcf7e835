"""Different adapter sets in one batch (difflora.composition.mixed) against fused sequential rendering.

8 requests (--requests), each with its own set of 2 adapters out of 8 (request i: adapters i and i+1 mod 8, at
0.7 and 0.4; synthetic rank --rank adapters on the UNet and text-encoder attention projections), rendered
(a) fused sequential, as `difflora serve` does today: for each request the Composer makes the set exactly
    the request's (from the kept W0, updates cached after the warm-up) and renders one image;
(b) mixed: one pipeline call of all the requests under MixedAdapters (its set-up included);
(c) the base model, no adapters, as one batch of the same size: (b) - (c) is what the hooks cost;
(d) the base model one image per call: what batching alone gains.
Each round runs the four in turn (after one warm-up round), so a change of load on a shared machine hits
all alike; the median of --rounds is reported, with the largest pixel difference between (a) and (b).

    python scripts/bench_mixed.py --steps 4 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from bench_generate import synthetic_adapter  # scripts/ is on sys.path when this file runs

from difflora.composition.composer import Composer
from difflora.composition.mixed import MixedAdapters, render_mixed
from difflora.config.spec import AdapterWeight
from difflora.generation.pipeline import default_size, render
from difflora.models.loading import load_pipeline

PROMPTS = [
    "a red circle on a white background",
    "a blue square, striped",
    "a green triangle",
    "a yellow cross",
]


def requests(count: int, adapters: int) -> list[list[AdapterWeight]]:
    return [
        [AdapterWeight(f"a{i % adapters}", 0.7), AdapterWeight(f"a{(i + 1) % adapters}", 0.4)]
        for i in range(count)
    ]


def timed(run: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def one_round(pipe: Any, sets: list[list[AdapterWeight]], loader: Callable, args: argparse.Namespace) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(sets))]
    seeds = list(range(len(sets)))
    width, height = default_size(pipe)
    batch = {"steps": args.steps, "batch_pixels": len(sets) * width * height}
    composer = Composer(pipe, "fused")

    def fused_sequential() -> list:
        images = []
        for prompt, seed, specs in zip(prompts, seeds, sets, strict=True):
            composer.set(specs, loader=loader)
            images += render(pipe, [prompt], seeds=[seed], steps=args.steps)
        composer.clear()
        return images

    fused_s, fused = timed(fused_sequential, args.device)
    setup_s, _ = timed(lambda: MixedAdapters(pipe, sets, loader=loader), args.device)
    mixed_s, mixed = timed(
        lambda: render_mixed(pipe, prompts, seeds, sets, loader=loader, steps=args.steps), args.device
    )
    base_batch_s, _ = timed(lambda: render(pipe, prompts, seeds=seeds, **batch), args.device)
    base_one_s, _ = timed(lambda: render(pipe, prompts, seeds=seeds, steps=args.steps), args.device)
    difference = max(
        int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
        for a, b in zip(fused, mixed, strict=True)
    )
    return {
        "fused_sequential_s": fused_s,
        "mixed_s": mixed_s,
        "mixed_setup_s": setup_s,
        "base_batch_s": base_batch_s,
        "base_one_by_one_s": base_one_s,
        "max_pixel_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    adapters = {f"a{i}": synthetic_adapter(pipe, seed=i, rank=args.rank) for i in range(args.adapters)}

    def loader(name: str) -> tuple:
        return adapters[name], None

    sets = requests(args.requests, args.adapters)
    one_round(pipe, sets, loader, args)  # warm-up: the composer's cached updates, the allocator
    rounds = [one_round(pipe, sets, loader, args) for _ in range(args.rounds)]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    median["max_pixel_difference"] = max(r["max_pixel_difference"] for r in rounds)
    images = args.requests
    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), {args.device}",
        "settings": vars(args),
        "median": median,
        "images_per_s": {
            "fused_sequential": images / median["fused_sequential_s"],
            "mixed_batch": images / median["mixed_s"],
            "base_batch": images / median["base_batch_s"],
            "base_one_by_one": images / median["base_one_by_one_s"],
        },
        "mixed_over_fused_sequential": median["fused_sequential_s"] / median["mixed_s"],
        "hook_overhead": median["mixed_s"] / median["base_batch_s"] - 1,
        "rounds": rounds,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
