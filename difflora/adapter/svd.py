"""AdaLoRA's SVD-form layers as ordinary LoRA pairs, so an adaptive-rank adapter is a plain LoRA everywhere.

peft's SVD layer (SVDLinear, SVDConv2d) computes ΔW = B·diag(E)·A · s / (ranknum + 1e-5), with s its
`scaling` and ranknum its initial rank; pruning a rank component sets its E entry to exactly zero (peft
masks, never resizes, during training). Dropping those components and folding E and the scale into A and
B gives a LoRA pair of the module's own rank r with ΔW = (alpha/r)·up·down exactly, alpha = r. The fold
splits sqrt(|E|·scale) between the two factors so both stay of similar magnitude (half-precision exports
round both alike).
"""

from __future__ import annotations

import torch
from peft.tuners.adalora import AdaLoraLayer
from torch import nn

from difflora.adapter.types import LoraWeights


def kept_components(layer: AdaLoraLayer, adapter_name: str) -> torch.Tensor:
    """Indices of the rank components still alive (E != 0): the module's current rank is their count."""
    return torch.nonzero(layer.lora_E[adapter_name].detach().reshape(-1)).reshape(-1)


def svd_to_lora(layer: AdaLoraLayer, adapter_name: str) -> LoraWeights | None:
    """The layer's update as an ordinary LoRA pair of its current rank; None when every component was
    pruned (ΔW is exactly zero: the module is left out of the adapter rather than written as zeros)."""
    keep = kept_components(layer, adapter_name)
    if keep.numel() == 0:
        return None
    a = layer.lora_A[adapter_name].detach().float()[keep]  # [r, in·k·k]
    b = layer.lora_B[adapter_name].detach().float()[:, keep]  # [out, r]
    e = layer.lora_E[adapter_name].detach().float().reshape(-1)[keep]
    ranknum = float(layer.ranknum[adapter_name].detach().reshape(-1)[0])
    factor = e * float(layer.scaling[adapter_name]) / (ranknum + 1e-5)
    root = factor.abs().sqrt()
    down = a * (root * factor.sign())[:, None]
    up = b * root[None, :]
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d):
        down = down.reshape(len(keep), *base.weight.shape[1:])  # [r, in, kh, kw], as a LoCon file stores it
        up = up.reshape(*up.shape, 1, 1)
    return LoraWeights(down=down.contiguous(), up=up.contiguous(), alpha=float(len(keep)))
