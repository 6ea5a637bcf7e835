"""Generation speed with composed adapters, side by side with the base model, in one run.

Measures, on the same prompts and seeds: the base model; 1, 2, 4, 8 adapters fused; the same dynamic
(peft forward); and the time to change the weights of an 8-adapter set in each mode. Configurations are
interleaved round-robin and the median of the repeats is reported, so a load change on a shared machine
hits every configuration alike. Adapters are synthetic (random A/B, rank --rank, on the default UNet and
text-encoder targets): speed does not depend on what an adapter learned.

    python scripts/bench_generate.py                   # embedded model, CPU
    python scripts/bench_generate.py --device cuda --model path/to/sd15

Targets (issue 5): fused with 8 adapters at most 1.03x the base time per image; re-weighting in fused
mode under 10% of one image's generation time on the embedded model. Prints a Markdown table for
BENCHMARKS.md ("Generation" section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for _name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
    os.environ.setdefault(_name, "error")  # the tokenizer's truncation notices would drown the table

import torch  # noqa: E402

from difflora.adapter.names import adaptable_modules, classic_name  # noqa: E402
from difflora.adapter.spec import TEXT_ENCODER_TARGETS, UNET_TARGETS  # noqa: E402
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights  # noqa: E402
from difflora.composition.composer import Composer  # noqa: E402
from difflora.config.spec import AdapterWeight  # noqa: E402
from difflora.generation.pipeline import render  # noqa: E402
from difflora.models.identity import model_identity  # noqa: E402
from difflora.models.loading import load_pipeline  # noqa: E402

PROMPTS = ["a red circle", "a blue square, striped", "a green triangle", "a yellow cross"]
COUNTS = (1, 2, 4, 8)


def synthetic_adapter(pipe, seed: int, rank: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    identity = model_identity(pipe)
    modules = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_ENCODER_TARGETS)):
        model = getattr(pipe, component)
        for live, module in adaptable_modules(model).items():
            if any(live.endswith("." + t) for t in targets):
                out_features, in_features = module.weight.shape[:2]
                down = torch.randn(rank, in_features, generator=generator) * 0.01
                up = torch.randn(out_features, rank, generator=generator) * 0.01
                key = f"{component}.{classic_name(component, live, model)}"
                modules[key] = LoraWeights(
                    down.to(module.weight.dtype), up.to(module.weight.dtype), float(rank)
                )
    meta = AdapterMeta(name=f"a{seed}", base_architecture=identity.architecture, base_hash=identity.base_hash)
    return Adapter(modules, meta)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_images(pipe, args) -> float:
    """Seconds per image for the benchmark prompts."""
    sync(args.device)
    start = time.perf_counter()
    render(pipe, PROMPTS[: args.images], seeds=list(range(args.images)), steps=args.steps, guidance=5.0)
    sync(args.device)
    return (time.perf_counter() - start) / args.images


def time_reweight(composer: Composer, count: int, repeats: int, device: str) -> float:
    """Median seconds to give an n-adapter set new weights (alternating two weight sets)."""
    names = [spec.name for spec in composer.adapters]
    times = []
    for repeat in range(repeats):
        weights = [AdapterWeight(n, (0.5 + 0.1 * ((i + repeat) % 3)) / count) for i, n in enumerate(names)]
        sync(device)
        start = time.perf_counter()
        composer.set_weights(weights)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    adapters = [synthetic_adapter(pipe, seed, args.rank) for seed in range(max(COUNTS))]
    configs = [("base", 0)] + [(mode, n) for mode in ("fused", "dynamic") for n in COUNTS]
    composers = {mode: Composer(pipe, mode) for mode in ("fused", "dynamic")}
    time_images(pipe, args)  # warm-up: first call pays allocator and kernel set-up
    samples: dict[str, list[float]] = {f"{m}-{n}": [] for m, n in configs}
    for _ in range(args.repeats):
        for mode, count in configs:
            for composer in composers.values():
                composer.clear()
            if count:
                for index, adapter in enumerate(adapters[:count]):
                    composers[mode].add(adapter, 1.0 / count, name=f"a{index}")
            samples[f"{mode}-{count}"].append(time_images(pipe, args))
    reweight = {}
    for mode, composer in composers.items():
        for other in composers.values():
            other.clear()
        for index, adapter in enumerate(adapters):
            composer.add(adapter, 1.0 / len(adapters), name=f"a{index}")
        reweight[mode] = time_reweight(composer, len(adapters), args.reweight_repeats, args.device)
        composer.clear()
    per_image = {key: statistics.median(values) for key, values in samples.items()}
    return {
        "per_image_s": per_image,
        "min_per_image_s": {key: min(values) for key, values in samples.items()},
        "samples_s": samples,
        "reweight_8_s": reweight,
        "identity": model_identity(pipe).name,
    }


def markdown(result: dict, args) -> str:
    base = result["per_image_s"]["base-0"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model: {result['identity']}; {args.steps} steps, "
        f"{args.images} images x {args.repeats} repeats (median), adapters rank {args.rank} on UNet+TE attention.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "Ratios to the base model: median of the repeats (min of the repeats in brackets; on a shared machine",
        "interference only ever adds time, so the min is the cleaner comparison).",
        "",
        "| adapters | fused s/image | fused / base | dynamic s/image | dynamic / base |",
        "|---|---|---|---|---|",
        f"| 0 (base) | {base:.4f} | 1.000 | {base:.4f} | 1.000 |",
    ]
    fastest = result["min_per_image_s"]
    for count in COUNTS:
        fused, dynamic = result["per_image_s"][f"fused-{count}"], result["per_image_s"][f"dynamic-{count}"]
        fused_min = fastest[f"fused-{count}"] / fastest["base-0"]
        dynamic_min = fastest[f"dynamic-{count}"] / fastest["base-0"]
        lines.append(
            f"| {count} | {fused:.4f} | {fused / base:.3f} ({fused_min:.3f}) "
            f"| {dynamic:.4f} | {dynamic / base:.3f} ({dynamic_min:.3f}) |"
        )
    lines.append("")
    for mode, seconds in result["reweight_8_s"].items():
        lines.append(
            f"Re-weighting 8 adapters, {mode}: {seconds * 1000:.2f} ms = {100 * seconds / base:.2f}% of one base image."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reweight-repeats", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result, args))


if __name__ == "__main__":
    main()
