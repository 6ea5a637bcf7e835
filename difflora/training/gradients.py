"""Per-layer gradient norms of the LoRA matrices, so a user can see which layers learn and which do not.

Every `every` optimizer steps (before clipping, after accumulation) the norm of each adapted layer's A and B
gradients is recorded; `gradients.csv` (step, layer, A norm, B norm) and `gradients.png` (a heat map,
layers x steps, of log10 of the norms) are written at each checkpoint and at the end, and TensorBoard gets
the total A and B norms. At the end, layers whose gradients vanished or exploded compared with the other
layers are named in a warning. B starts at zero, so A's gradient is exactly zero until B moves: the first
tenth of the run is left out of that judgement.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from difflora.errors import first_n
from difflora.safe_io import write_atomic

logger = logging.getLogger(__name__)

FIELDS = ("step", "layer", "grad_norm_a", "grad_norm_b")
VANISHING, EXPLODING = 1e-4, 1e2  # a layer's median norm relative to the median layer's
CELL = 4  # heat-map pixels per layer and per logged step


class GradientMonitor:
    def __init__(
        self, parameters: dict[str, torch.nn.Parameter], run_dir: Path, *, every: int, start_step: int
    ):
        self.every = every
        self.layers: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for key, parameter in parameters.items():
            if ".lora_A." in key:
                layer = key.split(".lora_A.")[0]
                self.layers[layer] = (parameter, parameters[key.replace(".lora_A.", ".lora_B.")])
        self.csv_path, self.png_path = run_dir / "gradients.csv", run_dir / "gradients.png"
        self.rows = [row for row in _read(self.csv_path) if int(row[0]) <= start_step]

    def record(self, step: int) -> tuple[float, float] | None:
        """Norms of this step's gradients when a record is due; returns the total (A, B) norms."""
        if not self.every or step % self.every:
            return None
        pairs = [(a.grad, b.grad) for a, b in self.layers.values()]
        if any(a is None or b is None for a, b in pairs):
            return None
        norms = torch._foreach_norm([g.float() for pair in pairs for g in pair])  # one fused pass
        values = torch.stack(norms).reshape(-1, 2).tolist()
        for layer, (norm_a, norm_b) in zip(self.layers, values, strict=True):
            self.rows.append((step, layer, norm_a, norm_b))
        return math.sqrt(sum(a * a for a, _ in values)), math.sqrt(sum(b * b for _, b in values))

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(FIELDS)
        writer.writerows((step, layer, f"{a:.6g}", f"{b:.6g}") for step, layer, a, b in self.rows)
        write_atomic(self.csv_path, buffer.getvalue().encode())
        if self.rows:
            image = io.BytesIO()
            draw_heat_map(self.rows, list(self.layers)).save(image, format="PNG")
            write_atomic(self.png_path, image.getvalue())

    def warnings(self, total_steps: int) -> list[str]:
        """Layers whose gradients vanished or exploded (median over the run after its first tenth)."""
        return [text for _, text in self.findings(total_steps)]

    def findings(self, total_steps: int) -> list[tuple[str, str]]:
        """(kind, warning) for each kind of trouble found: "vanishing", "exploding"."""
        medians = _layer_medians(self.rows, total_steps // 10)
        finite = [m for m in medians.values() if math.isfinite(m) and m > 0]
        if len(finite) < 2:
            return []
        typical = statistics.median(finite)
        vanished = sorted(k for k, m in medians.items() if m < VANISHING * typical)
        exploded = sorted(k for k, m in medians.items() if not math.isfinite(m) or m > EXPLODING * typical)
        found = []
        for kind, layers in (("vanishing", vanished), ("exploding", exploded)):
            if layers:
                text = f"{len(layers)} layer(s) with {kind} gradients: {first_n(layers, 5)}"
                found.append(
                    (kind, f"{text} (median LoRA gradient norm vs {typical:.3g} for the median layer)")
                )
        return found


def _layer_medians(rows: list[tuple], after_step: int) -> dict[str, float]:
    per_layer: dict[str, list[float]] = {}
    for step, layer, norm_a, norm_b in rows:
        if int(step) > after_step:
            per_layer.setdefault(layer, []).append(math.hypot(float(norm_a), float(norm_b)))
    return {layer: statistics.median(values) for layer, values in per_layer.items()}


def _read(path: Path) -> list[tuple]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return [(int(s), layer, float(a), float(b)) for s, layer, a, b in reader]


def draw_heat_map(rows: list[tuple], layers: list[str]) -> Image.Image:
    """Two panels (A left, B right): a row per layer, a column per logged step, brighter = larger log10
    norm (black = zero). Scaled to the run's own range, so it shows where gradients flow, not their units."""
    steps = sorted({int(row[0]) for row in rows})
    column = {step: index for index, step in enumerate(steps)}
    line = {layer: index for index, layer in enumerate(layers)}
    logs = [math.log10(v) for row in rows for v in row[2:] if v > 0 and math.isfinite(v)]
    low, high = (min(logs), max(logs)) if logs else (0.0, 1.0)
    width, height = len(steps) * CELL, max(1, len(layers)) * CELL
    image = Image.new("RGB", (2 * width + CELL, height), "white")
    draw = ImageDraw.Draw(image)
    for step, layer, *norms in rows:
        for panel, value in enumerate(norms):
            colour = _colour(value, low, high)
            x = panel * (width + CELL) + column[int(step)] * CELL
            y = line.get(layer, 0) * CELL
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=colour)
    return image


def _colour(value: float, low: float, high: float) -> tuple[int, int, int]:
    if not math.isfinite(value):
        return (255, 0, 0)  # red: a non-finite gradient
    if value <= 0:
        return (0, 0, 0)
    shade = int(255 * (math.log10(value) - low) / max(high - low, 1e-9))
    return (shade, shade, 255 - shade // 2)
