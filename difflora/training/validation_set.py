"""The held-out set of a run and what has been measured on it (difflora.training.validation measures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from difflora.data.batches import TrainingDataset


@dataclass
class Validation:
    """The held-out set and what has been measured on it."""

    dataset: TrainingDataset  # held-out images, centre-cropped, captions as written (no augmentation)
    names: tuple[str, ...]  # their file names, for the plan
    every: int  # --validate-every (0: at checkpoints and at the end only)
    keep_best: bool
    chunk: int  # rows per forward: twice the training batch (a forward without gradients holds far less)
    measured: dict[int, float] = field(default_factory=dict)  # step -> loss, measured by this process
    best: tuple[int, float] | None = None  # (checkpoint step, loss): the lowest at a checkpoint so far

    def offer(self, step: int) -> bool:
        """The checkpoint at `step` is being written: whether its loss is the lowest so far."""
        loss = self.measured.get(step)
        if loss is None or (self.best is not None and loss >= self.best[1]):
            return False
        self.best = (step, loss)
        return True


def best_adapter_path(adapter: Path) -> Path:
    """Where --keep-best writes the best checkpoint's adapter: `<name>.best.safetensors` beside the adapter."""
    return adapter.with_name(f"{adapter.stem}.best{adapter.suffix}")


def measurement_due(step: int, *, total: int, every: int, save_every: int) -> bool:
    """Validation and drift are measured every `every` steps, at each checkpoint and at the end."""
    return step == total or any(n and step % n == 0 for n in (every, save_every))
