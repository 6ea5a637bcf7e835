"""The spectrum heat map: a row per layer, a column per singular component, the cell's brightness the share
of that layer's energy (sᵢ² / Σ s²) the component carries. A LoRA whose energy sits in its first few columns
was trained at a higher rank than it needed.

Drawn with PIL, already a dependency: matplotlib is not among the pinned packages, and one PNG of coloured
cells with text does not justify its five extra dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from difflora.composition.spectrum import LayerSpectrum

CELL = 14  # pixels per cell: big enough to see a rank-4 layer's columns, small enough for 700 layers
FONT_SIZE = 11
# A perceptually ordered ramp (dark blue -> teal -> yellow), interpolated linearly between these anchors.
_RAMP = ((20, 20, 60), (40, 90, 140), (40, 160, 130), (160, 210, 60), (250, 230, 40))


def colour(share: float) -> tuple[int, int, int]:
    """The ramp's colour for a share of energy in [0, 1]."""
    share = min(max(share, 0.0), 1.0) * (len(_RAMP) - 1)
    low = min(int(share), len(_RAMP) - 2)
    t = share - low
    a, b = _RAMP[low], _RAMP[low + 1]
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def energy_shares(layer: LayerSpectrum) -> list[float]:
    total = layer.energy
    return [s * s / total if total > 0 else 0.0 for s in layer.singular_values]


def draw_spectrum_map(layers: Sequence[LayerSpectrum]) -> Image.Image:
    """The heat map with each layer's whole module name at the left and the component numbers on top."""
    font = ImageFont.load_default(size=FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 4 + max((int(measure.textlength(layer.module, font=font)) for layer in layers), default=0)
    columns = max((layer.rank for layer in layers), default=1)
    top = FONT_SIZE + 6
    image = Image.new("RGB", (label_w + columns * CELL + 2, top + len(layers) * CELL + 2), "white")
    draw = ImageDraw.Draw(image)
    for k in range(columns):
        if k == 0 or (k + 1) % 4 == 0:  # every fourth number: readable at rank 128
            draw.text((label_w + k * CELL + 1, 2), str(k + 1), fill="black", font=font)
    for row, layer in enumerate(layers):
        y = top + row * CELL
        draw.text((2, y + 1), layer.module, fill="black", font=font)
        for k, share in enumerate(energy_shares(layer)):
            x = label_w + k * CELL
            draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=colour(share))
    return image


def save_spectrum_map(layers: Sequence[LayerSpectrum], path: str | Path) -> Path:
    """Write the heat map PNG atomically."""
    import io

    from difflora.safe_io import write_atomic

    buffer = io.BytesIO()
    draw_spectrum_map(layers).save(buffer, format="PNG")
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)
