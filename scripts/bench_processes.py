"""Data-parallel training on CPU: one process against two under `accelerate launch` (gloo DDP).

The same `difflora train` command on the embedded model and `sample_data/style`, batch `--batch-size` per
process, run three ways, alternated `--repeats` times (each setting's fastest run counts):
- 1 process, 1 thread;
- 1 process, N threads (N = the cores);
- N processes of 1 thread each (`accelerate launch --multi_gpu --num_processes N`: on CPU torchrun starts
  them and difflora selects gloo).
Per setting: steady-state steps/s (median step time after `--warmup` steps, from loss.csv), images/s
(steps/s x batch x processes), the effective batch the adapter's metadata records, and wall time from
the command to the adapter. On CUDA machines with several GPUs the same script measures 1 GPU against N.

    python scripts/bench_processes.py [--steps 60] [--batch-size 4] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(processes: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    train = ["-m", "difflora", "train", str(REPO / "sample_data" / "style"), "--output-dir", str(out)]
    train += ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size)]
    train += ["--sample-every", "0", "--save-every", "0", "--num-threads", str(threads)]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
        command = [*launcher, "--num_processes", str(processes), "--main_process_port", "29533", *train]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{result.stderr[-4000:]}")
    from difflora.formats.read import load_adapter

    with open(out / "style.run" / "loss.csv", newline="") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)][args.warmup :]
    steps_per_s = 1.0 / statistics.median(seconds)
    batch = int(load_adapter(out / "style.safetensors").meta.extra["difflora.train.batch_size"])
    return {
        "processes": processes,
        "threads_per_process": threads,
        "steps_per_s": round(steps_per_s, 2),
        "images_per_s": round(steps_per_s * batch, 1),
        "effective_batch": batch,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    settings = [(1, 1), (1, cores), (cores, 1)]
    runs: dict[str, list[dict]] = {f"{p}x{t}": [] for p, t in settings}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):  # interleaved, so drift in machine load hits every setting
            for processes, threads in settings:
                out = Path(workdir) / f"{processes}x{threads}-{repeat}"
                result = _run(processes, threads, args, out)
                runs[f"{processes}x{threads}"].append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    best = {key: max(results, key=lambda r: r["steps_per_s"]) for key, results in runs.items()}
    single = best["1x1"]
    report = {
        "machine": f"{platform.machine()}, {cores} CPU cores, {platform.system()} {platform.release()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "best": best,
        "all_runs_steps_per_s": {k: [r["steps_per_s"] for r in v] for k, v in runs.items()},
        "images_per_s_vs_1x1": {
            k: round(r["images_per_s"] / single["images_per_s"], 2) for k, r in best.items()
        },
        "per_process_steps_per_s_vs_1x1": {
            k: round(r["steps_per_s"] / single["steps_per_s"], 2) for k, r in best.items()
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
