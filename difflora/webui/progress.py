"""A run's progress read from what the trainer writes into its run folder, nothing else: loss.csv's rows
(step, loss, smoothed loss, seconds per step, validation loss), the sample grids under samples/, the step
count from plan.txt, and timing.json once it has ended. The live stream and the Runs page both read it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflora.training.log import read_loss_csv

PLAN_STEPS = re.compile(r"^\s*length\s+(\d+) steps", re.MULTILINE)  # plan_text's "length" line
RECENT = 10  # steps the it/s is averaged over


@dataclass(frozen=True)
class Snapshot:
    """What the run folder says now: every logged row, the sample grids and the planned step count."""

    rows: list[dict[str, Any]]
    samples: list[str]
    total_steps: int | None

    def status(self) -> dict[str, Any]:
        """step, loss, smoothed loss, it/s and ETA (seconds) of the newest row; empty before the first."""
        if not self.rows:
            return {"step": 0, "total_steps": self.total_steps}
        last = self.rows[-1]
        recent = [row["seconds"] for row in self.rows[-RECENT:] if row["seconds"] > 0]
        rate = len(recent) / sum(recent) if recent else None
        left = (self.total_steps - last["step"]) if self.total_steps else None
        return {
            "step": last["step"],
            "total_steps": self.total_steps,
            "loss": last["loss"],
            "smoothed_loss": last["smoothed_loss"],
            "it_per_s": rate,
            "eta_s": left / rate if rate and left is not None else None,
        }


def snapshot(run_dir: Path) -> Snapshot:
    return Snapshot(loss_rows(run_dir), sample_grids(run_dir), planned_steps(run_dir))


def loss_rows(run_dir: Path) -> list[dict[str, Any]]:
    """loss.csv's complete rows as numbers (validation loss None where not measured)."""
    return [
        {
            "step": int(row["step"]),
            "epoch": int(row["epoch"]),
            "loss": float(row["loss"]),
            "smoothed_loss": float(row["smoothed_loss"]),
            "lr": float(row["lr"]),
            "seconds": float(row["seconds"]),
            "validation_loss": float(row["validation_loss"]) if row.get("validation_loss") else None,
        }
        for row in read_loss_csv(run_dir / "loss.csv")
    ]


def sample_grids(run_dir: Path) -> list[str]:
    """The sample grids' file names (step-NNNNNN.png), in step order; temporaries never match."""
    folder = run_dir / "samples"
    return sorted(path.name for path in folder.glob("step-*.png")) if folder.is_dir() else []


def planned_steps(run_dir: Path) -> int | None:
    plan = run_dir / "plan.txt"
    found = PLAN_STEPS.search(plan.read_text(errors="replace")) if plan.is_file() else None
    return int(found.group(1)) if found else None


def timing(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "timing.json"
    return json.loads(path.read_text()) if path.is_file() else {}
