"""Time to concept: how long after the command starts an adapter shows the subject it was trained on.

Both sides train on `sample_data/subject` (the plus-shaped "crossglyph") on the embedded model, each in its own
process, one after the other:
- difflora with its defaults (the plan's step count and learning rate, its default targets), sample grids
  off, a checkpoint every `--save-every` steps (each checkpoint holds the adapter so far);
- the reference loop of scripts/bench_train.py (diffusers' train_text_to_image_lora.py) at the script's own
  defaults: rank 4, learning rate 1e-4, constant schedule, the attention projections; at difflora's batch
  size (the script's default 16 is slower per step on this model), saving its adapter every
  `--reference-every` steps until `--budget-s` seconds after its start.

Each saved adapter's time is its file's modification time minus the moment its process was started, so
imports, model load and difflora's caching are all counted. Afterwards every adapter is composed at weight 1
on the embedded base and renders the subject prompt with fixed seeds; the cross score
(`difflora.embedded.signatures.cross_score`, threshold CROSS_THRESHOLD = 0.7) of each adapter, and of the
base (control), is reported, with the first time each side reaches the threshold.

    python scripts/bench_concept.py [--budget-s 240] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_support import SEEDS, adapter_signature  # noqa: E402

PROMPT = "a red crossglyph on a white background"
CHECKPOINTS = (15, 30, 45, 60, 90, 120, 180, 240, 360)  # wall-clock seconds shown in the table


def train_difflora(args: argparse.Namespace) -> None:
    from difflora.config.train import TrainConfig
    from difflora.training.trainer import train

    config = TrainConfig(
        data_dir=str(REPO / "sample_data" / "subject"),
        output_dir=str(Path(args.workdir) / "difflora"),
        sample_every=0,
        save_every=args.save_every,
        keep_checkpoints=10_000,
        num_threads=args.threads,
    )
    train(config, progress=False)


def train_reference(args: argparse.Namespace, began: float) -> None:
    from bench_train import run_reference

    snapshots = Path(args.workdir) / "reference"
    snapshots.mkdir(parents=True, exist_ok=True)
    settings = argparse.Namespace(
        data=str(REPO / "sample_data" / "subject"),
        model=None,
        rank=4,  # the script's default
        resolution=None,
        batch_size=args.batch_size,
        steps=1_000_000,  # stopped by the budget
        warmup=0,
        threads=args.threads,
        workdir=str(snapshots),
        snapshot_every=args.reference_every,
        snapshot_dir=str(snapshots),
        budget_s=args.budget_s,
        started_at=args.started_at,
    )
    run_reference(settings, began)


def _snapshots(workdir: Path, started: dict[str, float]) -> dict[str, list[tuple[float, int, Path]]]:
    """side -> [(seconds since its process started, step, adapter file)], in time order."""
    ours = [
        (path / "adapter.safetensors", int(path.name.split("-")[1]))
        for path in (workdir / "difflora" / "subject.run" / "checkpoints").glob("step-*")
    ]
    theirs = [
        (path, int(path.stem.split("-")[1])) for path in (workdir / "reference").glob("step-*.safetensors")
    ]
    return {
        side: sorted((path.stat().st_mtime - started[side], step, path) for path, step in files)
        for side, files in (("difflora", ours), ("reference", theirs))
    }


def _score(pipe, adapter) -> float:
    return adapter_signature(pipe, adapter, PROMPT, "cross_score")


def _child(kind: str, args: argparse.Namespace) -> float:
    """Runs one side; returns the wall time at which its process was started."""
    command = [sys.executable, __file__, "--child", kind, "--workdir", args.workdir]
    command += ["--threads", str(args.threads), "--budget-s", str(args.budget_s)]
    command += ["--save-every", str(args.save_every), "--reference-every", str(args.reference_every)]
    command += ["--batch-size", str(args.batch_size)]
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "BENCH_STARTED_AT": repr(started)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-4000:]}")
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=240.0, help="the reference's wall-clock budget")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=4, help="difflora's default")
    parser.add_argument("--save-every", type=int, default=25, help="difflora checkpoint cadence (steps)")
    parser.add_argument("--reference-every", type=int, default=50, help="reference snapshot cadence (steps)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=["difflora", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.started_at = float(os.environ["BENCH_STARTED_AT"])
        if args.child == "difflora":
            train_difflora(args)
        else:
            train_reference(args, time.perf_counter())
        return
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    import torch

    from difflora.embedded.signatures import CROSS_THRESHOLD
    from difflora.models.loading import load_pipeline

    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        started = {kind: _child(kind, args) for kind in ("difflora", "reference")}
        load = round(os.getloadavg()[0], 2)
        torch.set_num_threads(args.threads)
        pipe = load_pipeline(None)
        base = _score(pipe, None)
        scored = {
            side: [(round(t, 1), step, round(_score(pipe, path), 3)) for t, step, path in entries]
            for side, entries in _snapshots(Path(workdir), started).items()
        }
    first = {
        side: next(
            ({"seconds": t, "step": step} for t, step, score in rows if score >= CROSS_THRESHOLD), None
        )
        for side, rows in scored.items()
    }
    at_points = {
        side: {
            str(point): max((r for r in rows if r[0] <= point), default=None, key=lambda r: r[0])
            for point in CHECKPOINTS
        }
        for side, rows in scored.items()
    }
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "load_average_1min_after_training": load,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "prompt": PROMPT,
        "seeds": list(SEEDS),
        "threshold": CROSS_THRESHOLD,
        "base_cross_score": round(base, 3),
        "first_at_threshold": first,
        "score_at_wall_seconds": {
            side: {point: (row[2] if row else None) for point, row in points.items()}
            for side, points in at_points.items()
        },
        "snapshots_seconds_step_score": scored,
    }


if __name__ == "__main__":
    main()
