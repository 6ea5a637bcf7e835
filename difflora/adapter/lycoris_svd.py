"""A LyCORIS module as an ordinary LoRA pair with the same update, so merge and every LoRA tool take it.

ΔW (flattened to [out, in·k·k]) = U·diag(S)·Vᵀ; keeping the components above float32 rounding of ΔW gives
up = U·√S, down = √S·Vᵀ with alpha = rank (scale 1): B·A equals ΔW to float32 precision. Its rank is ΔW's
numerical rank: a LoKr of factor ranks r₁, r₂ has rank r₁·r₂, a LoHa of rank r up to r², a full module up to
min(out, in). `difflora merge --rank K` then truncates it like any LoRA, reporting the error per layer.
"""

from __future__ import annotations

import torch

from difflora.adapter.lycoris import LycorisWeights
from difflora.adapter.types import LoraWeights


def as_lora(weights: LycorisWeights) -> LoraWeights:
    """The LoRA pair whose update equals `weights`' (see the module docstring); [r, in, k, k]/[out, r, 1, 1]
    for a convolution's 4-D update."""
    delta = weights.delta()
    matrix = delta.double().flatten(1)
    u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = float(s[0]) * max(matrix.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    rank = max(int((s > tolerance).sum()), 1)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vt[:rank]
    if delta.ndim == 4:
        down, up = down.reshape(rank, *delta.shape[1:]), up[:, :, None, None]
    return LoraWeights(down=down.float().contiguous(), up=up.float().contiguous(), alpha=float(rank))
