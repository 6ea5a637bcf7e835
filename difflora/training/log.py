"""What a training run tells its user while it runs and leaves behind: a progress bar (step, smoothed loss,
it/s, ETA), `loss.csv`, `loss.png` (drawn with matplotlib's Agg
backend, off-screen) and, when tensorboard is
installed, TensorBoard event files. Only the main process creates a TrainLog.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from difflora.safe_io import disk_full_error, is_disk_full, write_atomic

logger = logging.getLogger(__name__)

# the validation losses are empty where not measured, and absent from logs of older runs
OPTIONAL_FIELDS = ("validation_loss", "ema_validation_loss", "drift")
CSV_FIELDS = ("step", "epoch", "loss", "smoothed_loss", "lr", "skipped", "seconds", *OPTIONAL_FIELDS)
SMOOTHING = 0.9  # exponential moving average factor of the displayed loss
CURVE_EVERY_S = 30.0  # least time between two drawings of loss.png at checkpoints


@dataclass
class LossPoint:
    step: int
    loss: float
    smoothed: float


def read_loss_csv(path: Path, *, up_to_step: int | None = None) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if _complete(row)]
    return [r for r in rows if up_to_step is None or int(r["step"]) <= up_to_step]


def _complete(row: dict[str, str | None]) -> bool:
    """A whole row: a run killed (or out of disk) mid-append can leave a torn last line, which a resumed
    run drops (it is past the checkpoint anyway) instead of failing on."""
    try:
        int(row["step"] or "")
        float(row["loss"] or "")
        float(row["smoothed_loss"] or "")
    except (KeyError, ValueError):
        return False
    required = (name for name in CSV_FIELDS if name not in OPTIONAL_FIELDS)
    return None not in row and all(row.get(name) is not None for name in required)


class TrainLog:
    """Progress bar + CSV + TensorBoard. `start_step` > 0 continues a resumed run: CSV rows written after
    the checkpoint (by the interrupted run) are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, progress: bool = True) -> None:
        self.csv_path = run_dir / "loss.csv"
        self.png_path = run_dir / "loss.png"
        rows = read_loss_csv(self.csv_path, up_to_step=start_step) if start_step else []
        self.points = [LossPoint(int(r["step"]), float(r["loss"]), float(r["smoothed_loss"])) for r in rows]
        self.validation = [
            (int(r["step"]), float(r["validation_loss"])) for r in rows if r.get("validation_loss")
        ]
        self._rewrite_csv(rows)
        self.smoothed: float | None = self.points[-1].smoothed if self.points else None
        self.bar = _progress_bar(total_steps, start_step) if progress else None
        self.tensorboard = _tensorboard_writer(run_dir / "tensorboard")
        self._curve_drawn_at = time.monotonic()  # when loss.png was last drawn
        self._curve_points = 0  # with how many steps

    def _rewrite_csv(self, rows: list[dict[str, str]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.csv_path, buffer.getvalue().encode())
        self._handle = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._handle, fieldnames=CSV_FIELDS)

    def step(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        *,
        skipped: bool,
        seconds: float,
        validation: dict[str, float] | None = None,
    ) -> None:
        """One step's row; `validation`: the validation losses measured at this step, by CSV column."""
        validation = validation or {}
        if math.isfinite(loss):
            self.smoothed = (
                loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
            )
            self.points.append(LossPoint(step, loss, self.smoothed))
        smoothed = self.smoothed if self.smoothed is not None else float("nan")
        row = {
            "step": step,
            "epoch": epoch,
            "loss": f"{loss:.6g}",
            "smoothed_loss": f"{smoothed:.6g}",
            "lr": f"{lr:.6g}",
            "skipped": int(skipped),
            "seconds": f"{seconds:.4f}",
            # repr: exact, so two runs' curves compare bit for bit
            **{name: repr(validation[name]) if name in validation else "" for name in OPTIONAL_FIELDS},
        }
        if "validation_loss" in validation:
            self.validation.append((step, validation["validation_loss"]))
        try:
            self._writer.writerow(row)
            self._handle.flush()
        except OSError as error:
            if not is_disk_full(error):
                raise
            kept = "the steps logged before are intact"
            raise disk_full_error(
                self.csv_path, len(",".join(map(str, row.values()))) + 1, kept=kept
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss/step", loss, step)
            self.tensorboard.add_scalar("loss/smoothed", smoothed, step)
            self.tensorboard.add_scalar("lr", lr, step)
            for name, value in validation.items():  # loss/validation, loss/ema_validation, loss/drift
                self.tensorboard.add_scalar("loss/" + name.removesuffix("_loss"), value, step)
        if self.bar is not None:
            self.bar.set_postfix_str(f"epoch {epoch}, loss {smoothed:.4f}, lr {lr:.2e}", refresh=False)
            self.bar.update(1)

    def write_curve(self) -> Path | None:
        """loss.png drawn from every step so far (nothing before the first step)."""
        if not self.points:
            return None
        self._curve_drawn_at, self._curve_points = time.monotonic(), len(self.points)
        return write_atomic(self.png_path, loss_curve_png(self.points, self.validation))

    def checkpoint_curve(self) -> Path | None:
        """loss.png redrawn at a checkpoint once CURVE_EVERY_S have passed since it was last drawn: a short
        run's frequent checkpoints would otherwise spend more time drawing than training. The run's end
        draws it whatever the time (`write_curve`)."""
        if time.monotonic() - self._curve_drawn_at < CURVE_EVERY_S:
            return None
        return self.write_curve()

    def finish_curve(self) -> Path | None:
        """loss.png drawn at the end of the run, unless the last drawing already had every step."""
        return self.write_curve() if len(self.points) != self._curve_points else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Extra scalars for TensorBoard (when installed)."""
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.tensorboard is not None:
            import numpy as np

            self.tensorboard.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def write(self, message: str) -> None:
        """A message that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            logger.info("%s", message)

    def end_progress(self) -> None:
        """Close the bar (its line ends), so what the run says after its last step gets lines of its own."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._handle.close()
        self.end_progress()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the CSV and PNG always exist
        logger.debug("tensorboard is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(log_dir=str(directory))


# ------------------------------------------------------------------------------------------ the PNG


def loss_curve_png(
    points: list[LossPoint],
    validation: list[tuple[int, float]] | None = None,
    size: tuple[int, int] = (640, 360),
) -> bytes:
    """The loss curve as a PNG of `size` pixels: raw loss (light) and its moving average (dark) against the
    step, on a linear axis whose top is the 98th percentile of the raw loss, so one spike does not flatten
    the whole curve; the validation loss (orange, a dot per measurement) where it was measured. Drawn on a
    matplotlib Figure of its own (no pyplot: no global state, safe beside other threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    validation = validation or []
    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    # fixed margins that fit the labels, not layout="constrained": that measures every text each time and
    # took a third of the drawing's time, paid at every checkpoint
    figure.subplots_adjust(left=0.12, right=0.98, bottom=0.13, top=0.91)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [p.step for p in points]
    axes.plot(steps, [p.loss for p in points], color="#aabee6", linewidth=1, label="per step")
    axes.plot(steps, [p.smoothed for p in points], color="#14328c", linewidth=2, label="moving average")
    if validation:
        at, values = zip(*validation, strict=True)
        axes.plot(at, values, color="#e67814", linewidth=2, marker="o", markersize=4, label="validation")
    axes.set_ylim(*_loss_range(points, validation))
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # short tick labels fit the margin
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"loss, {len(points)} steps", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _loss_range(points: list[LossPoint], validation: list[tuple[int, float]]) -> tuple[float, float]:
    """From the lowest value drawn to the raw loss's 98th percentile (or a higher average or validation
    value); never empty."""
    losses = sorted(p.loss for p in points)
    low = min(losses[0], min(p.smoothed for p in points), *(v for _, v in validation))
    high = losses[min(len(losses) - 1, int(0.98 * len(losses)))]
    high = max(high, max(p.smoothed for p in points), *(v for _, v in validation))
    margin = 0.03 * (high - low) if high > low else 1e-6
    return low - margin, high + margin


def draw_loss_curve(
    points: list[LossPoint],
    validation: list[tuple[int, float]] | None = None,
    size: tuple[int, int] = (640, 360),
) -> Image.Image:
    """The loss curve (`loss_curve_png`) as an image."""
    return Image.open(io.BytesIO(loss_curve_png(points, validation, size)))
