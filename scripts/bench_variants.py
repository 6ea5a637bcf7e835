"""LoRA variants against plain LoRA at the same rank: step time, peak memory, and what they learned.

Each variant trains `sample_data/style` on the embedded model in its own process (so peak memory is its
own) with difflora's defaults (rank 8, the embedded model's default targets, its learning rate and
schedule) and the same number of steps, seed and thread count; only the variant's flags differ. Then each
adapter renders the style prompt with fixed seeds on the base, and the style's signature (horizontal
stripes, `difflora.embedded.signatures.stripe_energy`, threshold STRIPE_THRESHOLD = 0.2) is measured, with the
base alone as control. Runs alternate `--repeats` times; each variant's fastest run counts for speed.

    python scripts/bench_variants.py [--steps 150] [--threads 2] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_support import adapter_signature  # noqa: E402

PROMPT = "a red circle on a white background, zebrastripes style"
VARIANTS: dict[str, dict] = {
    "lora": {},
    "rslora": {"rslora": True},
    "loraplus (ratio 16)": {"loraplus_ratio": 16.0},
    "locon (conv rank 16)": {"conv_rank": 16, "conv_alpha": 16.0},
    "dora": {"dora": True},
    "adaptive rank (AdaLoRA)": {"adaptive_rank": True},
    "quantized base (int8)": {"quantize_base": "int8"},
}


def _train(name: str, args: argparse.Namespace) -> dict:
    from difflora.config.train import TrainConfig
    from difflora.training.trainer import train

    out = Path(args.workdir) / name.split()[0]
    config = TrainConfig(
        data_dir=str(REPO / "sample_data" / "style"),
        output_dir=str(out),
        max_steps=args.steps,
        sample_every=0,
        save_every=0,
        num_threads=args.threads,
        **VARIANTS[name],
    )
    adapter = train(config, progress=False)
    with open(out / "style.run" / "loss.csv", newline="") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)][5:]
    return {
        "adapter": str(adapter),
        "step_s": statistics.median(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _signature(pipe, adapter) -> float:
    return adapter_signature(pipe, adapter, PROMPT, "stripe_energy")


def _child(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", name, "--workdir", args.workdir]
    command += ["--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_train(args.child, args)))
        return
    import torch

    from difflora.models.loading import load_pipeline

    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every variant
            for name in VARIANTS:
                results[name].append(_child(name, args))
                print(name, json.dumps(results[name][-1]), file=sys.stderr, flush=True)
        torch.set_num_threads(args.threads)
        pipe = load_pipeline(None)
        base = _signature(pipe, None)
        rows = {name: _row(runs, pipe) for name, runs in results.items()}
    plain = rows["lora"]
    for row in rows.values():
        if "step_s" in row:
            row["step_time_vs_lora"] = round(row["step_s"] / plain["step_s"], 2)
            row["peak_rss_vs_lora"] = round(row["peak_rss_mib"] / plain["peak_rss_mib"], 2)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "prompt": PROMPT,
        "base_stripe_energy": round(base, 3),
        "variants": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _row(runs: list[dict], pipe) -> dict:
    done = [r for r in runs if "error" not in r]
    if not done:
        return {"error": runs[-1]["error"]}
    best = min(done, key=lambda r: r["step_s"])
    return {
        "step_s": round(best["step_s"], 4),
        "peak_rss_mib": round(best["peak_rss_mib"], 1),
        "wall_s": round(best["wall_s"], 1),
        "stripe_energy": round(_signature(pipe, best["adapter"]), 3),
    }


if __name__ == "__main__":
    main()
