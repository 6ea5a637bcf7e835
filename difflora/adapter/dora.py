"""DoRA (Liu et al. 2024, weight-decomposed LoRA): the weight math the composer, the report and the formats share.

A DoRA module holds LoRA factors (B, A, scale s = alpha/rank) and a magnitude vector m. Its weight is the
direction V = W0 + s·B·A, normalised and scaled by m along one of two axes:

* "out" (what difflora trains, through peft's `use_dora`; peft's `lora_magnitude_vector`; LyCORIS and
  OneTrainer "wd_on_out"): one magnitude per output row, W[i] = m[i] · V[i] / ‖V[i]‖, the norm taken over
  the input dimension (and the kernel of a convolution);
* "in" (kohya/LyCORIS `dora_scale` as every ComfyUI, A1111 and Forge version applies it): one magnitude per
  input column, W[:, j] = m[j] · V[:, j] / ‖V[:, j]‖, the norm taken over the output dimension (and kernel).

peft detaches the norm from the gradient while training; its value in the forward pass is this one. The
weight is not W0 plus an update independent of W0, so DoRA is not additive: `difflora.composition.composer`
applies a DoRA module as its effective update W − W0, computed against the base weight W0.

Neither axis can express the other: a row scaling of V is not a column scaling of any V' = W0 + s·B'·A'
(they differ by diag(g)·W0 − W0·diag(c), full rank unless every row factor g = m / ‖V‖ is the same).
`column_magnitude` gives the per-input-column magnitude whose weight is closest to a per-row one.
"""

from __future__ import annotations

import torch

AXES: tuple[str, ...] = ("out", "in")
AXIS_NAMES = {"out": "per output row", "in": "per input column"}


def direction(base: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """V = W0 + s·B·A in float32, shaped like the base weight (`update` is s·B·A in any layout)."""
    return base.float() + update.float().reshape(base.shape)


def axis_norms(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖ along `axis`, shaped to broadcast over W: [out, 1, ...] per row, [1, in, 1, ...] per column."""
    if axis == "out":
        return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    if axis == "in":
        columns = weight.transpose(0, 1).flatten(1).norm(dim=1)
        return columns.reshape(1, -1, *[1] * (weight.ndim - 2))
    raise ValueError(f"DoRA axis must be one of {AXES}, got {axis!r}")


def broadcast(magnitude: torch.Tensor, axis: str, ndim: int) -> torch.Tensor:
    """A 1-D magnitude vector shaped like `axis_norms` gives for a weight of `ndim` dimensions."""
    flat = magnitude.float().reshape(-1)
    return flat.reshape(-1, *[1] * (ndim - 1)) if axis == "out" else flat.reshape(1, -1, *[1] * (ndim - 2))


def decomposed_weight(
    base: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor, axis: str
) -> torch.Tensor:
    """The DoRA module's weight m · V / ‖V‖ along `axis` (float32, shaped like `base`)."""
    v = direction(base, update)
    return v * (broadcast(magnitude, axis, v.ndim) / axis_norms(v, axis))


def column_magnitude(base: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The per-input-column magnitude d whose weight V·d/‖V‖_col (same V = W0 + s·B·A) is closest, in the
    Frobenius norm, to the per-output-row weight W = m·V/‖V‖_row: column by column, the least-squares
    scale of V[:, j] towards W[:, j] is c_j = ⟨V[:, j], W[:, j]⟩ / ‖V[:, j]‖², so d_j = c_j · ‖V[:, j]‖.
    It equals W exactly when every row factor m_i/‖V_i‖ is the same (e.g. an untrained adapter)."""
    v = direction(base, update)
    target = v * (broadcast(magnitude, "out", v.ndim) / axis_norms(v, "out"))
    columns = v.transpose(0, 1).flatten(1)
    projections = (columns * target.transpose(0, 1).flatten(1)).sum(dim=1)
    return projections / columns.norm(dim=1)
