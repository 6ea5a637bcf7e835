"""Seeded procedural drawing of the embedded model's world: shapes, colours, backgrounds, stripes.

Everything the embedded model was pretrained on, and the two sample concepts it never saw, are drawn
here, vectorised over a batch with numpy (anti-aliased signed-distance rendering, no image files):

* base scenes: a circle, square or triangle in one of six hue-separated colours on a white, black or
  gray background, varied position, size and shade; captioned "a red circle on a white background".
* the style concept (never in pretraining): dark horizontal stripes, period `STYLE_PERIOD` px, over
  the whole image; captioned "..., zebrastripes style".
* the subject concept (never in pretraining): a plus-shaped cross, arms one third of its size wide;
  captioned "a red crossglyph on a white background".

The same seed always gives the same images and captions.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

# Hues 60 degrees apart so a colour classifier has +-30 degrees of margin on each side.
COLOUR_HUES: dict[str, float] = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
COLOURS = tuple(COLOUR_HUES)
BACKGROUND_LEVELS: dict[str, float] = {"white": 245.0, "gray": 128.0, "black": 12.0}
BACKGROUNDS = tuple(BACKGROUND_LEVELS)
SHAPES = ("circle", "square", "triangle")
SUBJECT_SHAPE = "cross"
ALL_SHAPES = (*SHAPES, SUBJECT_SHAPE)

STYLE_TRIGGER = "zebrastripes"
SUBJECT_TRIGGER = "crossglyph"
STYLE_PERIOD = 8  # px; dark half-period then light half-period
STYLE_DARKEN = 0.15  # stripe rows keep this fraction of their brightness

SIZE_RANGE = (22.0, 40.0)  # side of the shape's bounding box, px
CENTRE_JITTER = 8.0  # px around the image centre


@dataclass
class SceneBatch:
    """Parameters of N scenes, one array entry per image."""

    shape: np.ndarray  # int index into ALL_SHAPES
    colour: np.ndarray  # int index into COLOURS
    background: np.ndarray  # int index into BACKGROUNDS
    rgb: np.ndarray  # float [N, 3] foreground colour 0..255
    bg_level: np.ndarray  # float [N] background grey level 0..255
    cx: np.ndarray
    cy: np.ndarray
    size: np.ndarray
    stripe_period: np.ndarray  # 0 = no stripes
    stripe_phase: np.ndarray
    stripe_vertical: np.ndarray  # bool; the style concept is horizontal, vertical only for VAE variety

    def __len__(self) -> int:
        return len(self.shape)


def _colour_rgb(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """Jitter hue (+-8 deg), saturation and value a little so colours are a range, not a point."""
    hues = np.array([COLOUR_HUES[c] for c in COLOURS])[colour] + rng.uniform(-8, 8, len(colour))
    sats = rng.uniform(0.8, 0.95, len(colour))
    vals = rng.uniform(0.8, 0.95, len(colour))
    out = [colorsys.hsv_to_rgb((h % 360) / 360, s, v) for h, s, v in zip(hues, sats, vals, strict=True)]
    return np.asarray(out, dtype=np.float64) * 255.0


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    shapes: tuple[str, ...] = SHAPES,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    stripes: bool = False,
) -> SceneBatch:
    """Draw N random scene parameters. `stripes=True` gives the style concept's horizontal stripes."""
    shape = rng.choice([ALL_SHAPES.index(s) for s in shapes], n)
    colour = rng.integers(0, len(COLOURS), n)
    background = rng.choice([BACKGROUNDS.index(b) for b in backgrounds], n)
    levels = np.array([BACKGROUND_LEVELS[b] for b in BACKGROUNDS])[background]
    size = rng.uniform(*SIZE_RANGE, n)
    return SceneBatch(
        shape=shape,
        colour=colour,
        background=background,
        rgb=_colour_rgb(rng, colour),
        bg_level=np.clip(levels + rng.uniform(-10, 10, n), 0, 255),
        cx=IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, n),
        cy=IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, n),
        size=size,
        stripe_period=np.full(n, STYLE_PERIOD if stripes else 0),
        stripe_phase=rng.integers(0, STYLE_PERIOD, n),
        stripe_vertical=np.zeros(n, dtype=bool),
    )


def _slice(scenes: SceneBatch, start: int, stop: int) -> SceneBatch:
    return SceneBatch(**{k: v[start:stop] for k, v in vars(scenes).items()})


def _coverage(scenes: SceneBatch) -> np.ndarray:
    """Anti-aliased coverage [N, H, W] in 0..1 from each shape's (approximate) signed distance."""
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - scenes.cx[:, None, None].astype(np.float32)
    dy = grid[None, :, None] - scenes.cy[:, None, None].astype(np.float32)
    half = (scenes.size / 2)[:, None, None].astype(np.float32)
    adx, ady = np.abs(dx), np.abs(dy)
    circle = np.sqrt(dx**2 + dy**2) - half
    square = np.maximum(adx, ady) - half
    # Upward isosceles triangle, base = height = size: apex (0, -half), base corners (+-half, half).
    slant = (2 * adx - (dy + half) * 1.0) / np.sqrt(5.0)  # distance to the two slanted edges
    triangle = np.maximum(slant * 1.0, dy - half)
    arm = half / 3
    cross = np.minimum(np.maximum(adx - arm, ady - half), np.maximum(adx - half, ady - arm))
    sdf = np.choose(scenes.shape[:, None, None], [circle, square, triangle, cross])
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _stripe_mask(scenes: SceneBatch) -> np.ndarray:
    """1.0 on dark stripe rows (or columns), else 0.0; all zero where stripe_period == 0."""
    idx = np.arange(IMAGE_SIZE)
    period = np.maximum(scenes.stripe_period, 1)[:, None, None]
    rows = (idx[None, :, None] + scenes.stripe_phase[:, None, None]) % period
    cols = (idx[None, None, :] + scenes.stripe_phase[:, None, None]) % period
    pos = np.where(scenes.stripe_vertical[:, None, None], cols, rows)
    on = (pos < period / 2) & (scenes.stripe_period[:, None, None] > 0)
    return on.astype(np.float32)


def render(scenes: SceneBatch, chunk: int = 1024) -> np.ndarray:
    """Images uint8 [N, 64, 64, 3] for the given scenes (in chunks: float temporaries stay small)."""
    if len(scenes) > chunk:
        parts = [render(_slice(scenes, i, i + chunk)) for i in range(0, len(scenes), chunk)]
        return np.concatenate(parts)
    cov = _coverage(scenes)[..., None]
    fg = scenes.rgb[:, None, None, :].astype(np.float32)
    bg = scenes.bg_level[:, None, None, None].astype(np.float32)
    img = cov * fg + (1 - cov) * bg
    img = img * (1 - (1 - STYLE_DARKEN) * _stripe_mask(scenes)[..., None])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption(scenes: SceneBatch, i: int, with_background: bool = True) -> str:
    """Caption of scene i: "a red circle on a white background" (+ trigger words for the concepts)."""
    shape = ALL_SHAPES[scenes.shape[i]]
    noun = SUBJECT_TRIGGER if shape == SUBJECT_SHAPE else shape
    text = f"a {COLOURS[scenes.colour[i]]} {noun}"
    if with_background:
        text += f" on a {BACKGROUNDS[scenes.background[i]]} background"
    if scenes.stripe_period[i] > 0 and not scenes.stripe_vertical[i]:
        text += f", {STYLE_TRIGGER} style"
    return text


def base_batch(seed: int, n: int) -> tuple[np.ndarray, list[str]]:
    """N pretraining images and captions (base shapes only, no concepts) for a seed."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n)
    return render(scenes), [caption(scenes, i) for i in range(n)]


def style_batch(seed: int, n: int) -> tuple[np.ndarray, list[str]]:
    """N images of the style concept (stripes over base shapes on white/gray) and their captions."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, backgrounds=("white", "gray"), stripes=True)
    return render(scenes), [caption(scenes, i) for i in range(n)]


def subject_batch(seed: int, n: int) -> tuple[np.ndarray, list[str]]:
    """N images of the subject concept (a cross in any colour/background) and their captions."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, shapes=(SUBJECT_SHAPE,))
    return render(scenes), [caption(scenes, i) for i in range(n)]


def autoencoder_batch(seed: int, n: int) -> np.ndarray:
    """Varied images for training the VAE alone: all shapes, stripes of several periods/orientations.

    A general-purpose autoencoder must reconstruct textures and shapes the UNet never learns to draw,
    so that LoRA adapters can learn them later; the UNet itself is trained on base scenes only.
    """
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, shapes=ALL_SHAPES)
    striped = rng.random(n) < 0.4
    scenes.stripe_period = np.where(striped, rng.choice([4, 6, 8, 10, 12, 16], n), 0)
    scenes.stripe_phase = rng.integers(0, 16, n)
    scenes.stripe_vertical = rng.random(n) < 0.3
    return render(scenes)
