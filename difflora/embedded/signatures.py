"""Measures of what an image of the embedded model's world shows (numpy + PIL only).

Used by the evaluation script and by tests that must prove a model drew what it was asked for:

* `dominant_colour(img)`: the named colour (see shapes.COLOURS) most foreground pixels have.
* `classify_shape(img)`: "circle" | "square" | "triangle" | "cross" | "none", from the largest
  foreground blob's fill ratio of its bounding box (square 1.0, circle pi/4 = 0.79, triangle 0.5)
  and from `cross_score`.
* `stripe_energy(img)`: share of the image's variation in horizontal stripes of about the style
  concept's period (8 px). Style images measure ~0.5-0.8, flat shapes < 0.05.
  `STRIPE_THRESHOLD` = 0.2 separates them.
* `cross_score(img)`: how plus-shaped the foreground is: mean fill of the five cells of a plus in a
  3x3 grid over the blob's bounding box minus the mean fill of the four corner cells. A cross scores
  ~1, a circle ~0.45, a triangle ~0.2, a square ~0. `CROSS_THRESHOLD` = 0.7.

The foreground is found by chroma (max - min of RGB): every drawn colour is saturated while the
backgrounds, and the dark stripes laid over them, are grey. A vertical closing bridges the gaps that
dark stripe rows cut into a striped shape, so the shape measures also work on striped images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from difflora.embedded.shapes import COLOUR_HUES, STYLE_PERIOD

COLOURFULNESS_MIN = 70.0  # of 255; foreground colours are drawn with chroma >= ~160
STRIPE_THRESHOLD = 0.2
CROSS_THRESHOLD = 0.7
SQUARE_MIN_FILL = 0.89  # midpoint of square 1.0 and circle 0.785
CIRCLE_MIN_FILL = 0.64  # midpoint of circle 0.785 and triangle 0.5
MIN_BLOB_PIXELS = 12


def as_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """Float RGB array [H, W, 3] in 0..255 from a PIL image or a uint8/float array."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    return np.asarray(img, dtype=np.float64)[..., :3]


def _close_vertical(mask: np.ndarray, radius: int = STYLE_PERIOD // 4) -> np.ndarray:
    """Dilate then erode along y: bridges gaps of up to 2*radius rows (dark stripe bands)."""

    def shift_any(m: np.ndarray, op) -> np.ndarray:
        out = m.copy()
        for k in range(1, radius + 1):
            up = np.zeros_like(m)
            down = np.zeros_like(m)
            up[:-k] = m[k:]
            down[k:] = m[:-k]
            out = op(out, op(up, down))
        return out

    dilated = shift_any(mask, np.logical_or)
    # Erosion treats outside the image as foreground, so closing never trims a shape at the border.
    padded = np.pad(dilated, ((radius, radius), (0, 0)), constant_values=True)
    return shift_any(padded, np.logical_and)[radius:-radius]


def foreground_mask(img: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean [H, W]: saturated (coloured) pixels, gaps from dark stripe rows closed."""
    arr = as_array(img)
    colourfulness = arr.max(axis=-1) - arr.min(axis=-1)
    return _close_vertical(colourfulness > COLOURFULNESS_MIN)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The 4-connected component of `mask` with the most pixels (flood fill by repeated dilation)."""
    remaining = mask.copy()
    best = np.zeros_like(mask)
    while remaining.sum() > best.sum():
        seed = np.zeros_like(mask)
        seed[np.unravel_index(np.argmax(remaining), mask.shape)] = True
        blob = seed
        while True:
            grown = blob.copy()
            grown[1:] |= blob[:-1]
            grown[:-1] |= blob[1:]
            grown[:, 1:] |= blob[:, :-1]
            grown[:, :-1] |= blob[:, 1:]
            grown &= mask
            if (grown == blob).all():
                break
            blob = grown
        if blob.sum() > best.sum():
            best = blob
        remaining &= ~blob
    return best


def dominant_colour(img: Image.Image | np.ndarray) -> str | None:
    """Name of the colour (nearest hue centre) most foreground pixels have; None without foreground."""
    arr = as_array(img)
    mask = (arr.max(axis=-1) - arr.min(axis=-1)) > COLOURFULNESS_MIN
    if mask.sum() < MIN_BLOB_PIXELS:
        return None
    px = arr[mask] / 255.0
    hue = _hue_degrees(px)
    names = list(COLOUR_HUES)
    centres = np.array([COLOUR_HUES[n] for n in names])
    dist = np.abs((hue[:, None] - centres[None, :] + 180.0) % 360.0 - 180.0)
    votes = np.bincount(dist.argmin(axis=1), minlength=len(names))
    return names[int(votes.argmax())]


def _hue_degrees(px: np.ndarray) -> np.ndarray:
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    mx, mn = px.max(axis=1), px.min(axis=1)
    delta = np.maximum(mx - mn, 1e-9)
    hue = np.where(mx == r, (g - b) / delta % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return hue * 60.0


def _blob_box(img: Image.Image | np.ndarray) -> np.ndarray | None:
    blob = largest_blob(foreground_mask(img))
    if blob.sum() < MIN_BLOB_PIXELS:
        return None
    ys, xs = np.nonzero(blob)
    return blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def cross_score(img: Image.Image | np.ndarray) -> float:
    """Plus-likeness: mean fill of the plus cells minus mean fill of the corner cells of a 3x3 grid."""
    box = _blob_box(img)
    if box is None or min(box.shape) < 3:
        return 0.0
    h, w = box.shape
    ys = [0, round(h / 3), round(2 * h / 3), h]
    xs = [0, round(w / 3), round(2 * w / 3), w]
    fill = np.array([[box[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean() for j in range(3)] for i in range(3)])
    plus = (fill[1, :].sum() + fill[0, 1] + fill[2, 1]) / 5.0
    corners = (fill[0, 0] + fill[0, 2] + fill[2, 0] + fill[2, 2]) / 4.0
    return float(plus - corners)


def classify_shape(img: Image.Image | np.ndarray) -> str:
    """ "circle" | "square" | "triangle" | "cross" | "none" (see the module docstring for the rule)."""
    box = _blob_box(img)
    if box is None:
        return "none"
    if cross_score(img) >= CROSS_THRESHOLD:
        return "cross"
    fill = float(box.mean())
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def stripe_energy(img: Image.Image | np.ndarray) -> float:
    """Share of the grey image's AC energy at horizontal-stripe frequencies near the style's period.

    Band: vertical frequency within 64/period +- 2 cycles per image height, horizontal frequency
    within +-1 cycle (stripes are nearly constant along x).
    """
    grey = as_array(img).mean(axis=-1)
    spec = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    h, w = grey.shape
    fy = np.abs(np.fft.fftfreq(h) * h)
    fx = np.abs(np.fft.fftfreq(w) * w)
    centre = h / STYLE_PERIOD
    band = (np.abs(fy[:, None] - centre) <= 2) & (fx[None, :] <= 1)
    total = spec.sum()
    return 0.0 if total <= 0 else float(spec[band].sum() / total)
