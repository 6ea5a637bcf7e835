"""Exact conversion between LoRAs on split projections and LoRAs on the fused layer they are slices of.

Original DiT checkpoints (Flux's BFL layout, SD3's) hold q, k and v (and in Flux's single blocks the MLP
input too) as one Linear whose output rows are the parts stacked; diffusers, and difflora's training, hold
one Linear per part. For parts i with LoRA (down_i [r_i, in], up_i [out_i, r_i], scale s_i = alpha_i / r_i):

- fusing: down = the downs stacked ([Σ r_i, in]), up = block-diagonal (part i's rows, its own rank columns;
  a part without a LoRA gets zero rows), alpha = s · Σ r_i. Then scale · up @ down has part i's rows equal
  to s · up_i @ down_i = ΔW_i when every s_i = s. Parts with different scales fold s_i / s into their
  up block (exact up to one rounding of those values).
- splitting: an up whose rows for each part use only their own rank columns (block-sparse: what fusing
  writes, and kohya's `split_qkv`) gives each part its own columns of down and up with the fused scale;
  a dense up (a LoRA trained on the fused layer) gives each part the whole shared down and its rows of up.
  Both are exact: part i's ΔW is the fused ΔW's rows for part i, bit for bit in float32.

A layer may also store its output rows permuted against diffusers' module (BFL's final modulation holds
(shift, scale) where diffusers holds (scale, shift)): `swap_halves` moves the up's two row halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from difflora.adapter.types import LoraWeights


@dataclass(frozen=True)
class Part:
    """One split module inside a fused layer: its difflora key and its number of output rows."""

    key: str
    rows: int


@dataclass(frozen=True)
class FusedLayer:
    """A layer of an original checkpoint made of `parts` (in row order), each a module difflora trains."""

    name: str
    parts: tuple[Part, ...]
    in_features: int
    swap_halves: bool = False

    @property
    def out_features(self) -> int:
        return sum(part.rows for part in self.parts)

    def row_ranges(self) -> list[tuple[int, int]]:
        """(start, stop) of each part's rows in the fused weight (ComfyUI's slice offsets)."""
        ranges, start = [], 0
        for part in self.parts:
            ranges.append((start, start + part.rows))
            start += part.rows
        return ranges


def fuse(layer: FusedLayer, weights: Mapping[str, LoraWeights]) -> LoraWeights:
    """The LoRA on the fused layer equal, part by part, to the split LoRAs `weights` (difflora key -> LoRA;
    at least one of the layer's parts; DoRA modules have no fused form and are refused by the caller)."""
    present = [(part, weights[part.key]) for part in layer.parts if part.key in weights]
    if not present:
        raise ValueError(f"no LoRA on any part of {layer.name}")
    scale = present[0][1].scale
    rank = sum(w.rank for _, w in present)
    dtype = present[0][1].down.dtype
    down = torch.cat([w.down.to(dtype) for _, w in present], dim=0)
    up = torch.zeros(layer.out_features, rank, dtype=dtype)
    column = 0
    for (start, stop), part in zip(layer.row_ranges(), layer.parts, strict=True):
        if part.key not in weights:
            continue
        lora = weights[part.key]
        block = lora.up.to(dtype)
        if lora.scale != scale:  # fold the part's own scale into its rows (one rounding)
            block = (block.double() * (lora.scale / scale)).to(dtype)
        up[start:stop, column : column + lora.rank] = block
        column += lora.rank
    up = _swap(up) if layer.swap_halves else up
    return LoraWeights(down=down, up=up, alpha=scale * rank)


def split(layer: FusedLayer, weights: LoraWeights) -> dict[str, LoraWeights]:
    """The split LoRAs (difflora key -> LoRA) whose updates are the fused LoRA's rows for each part. A part
    whose rows are all zero gets no LoRA (its update is zero), unless every part's are."""
    if weights.up.shape[0] != layer.out_features:
        raise ValueError(
            f"{layer.name} has {layer.out_features} output rows, the LoRA's up has {weights.up.shape[0]}"
        )
    up = _swap(weights.up) if layer.swap_halves else weights.up
    blocks = [up[start:stop] for start, stop in layer.row_ranges()]
    columns = [torch.nonzero(block.abs().sum(dim=0)).flatten() for block in blocks]
    used = [c for c in columns if c.numel()]
    disjoint = bool(used) and sum(c.numel() for c in used) == torch.cat(used).unique().numel()
    result: dict[str, LoraWeights] = {}
    for part, block, cols in zip(layer.parts, blocks, columns, strict=True):
        if not disjoint:  # dense (or all zero): the shared down, this part's rows of up
            result[part.key] = LoraWeights(down=weights.down, up=block.contiguous(), alpha=weights.alpha)
        elif cols.numel():  # block-sparse: this part's own rank columns, the fused scale kept
            scale = weights.scale
            down, part_up = weights.down[cols].contiguous(), block[:, cols].contiguous()
            result[part.key] = LoraWeights(down=down, up=part_up, alpha=scale * cols.numel())
    return result


def _swap(up: torch.Tensor) -> torch.Tensor:
    """The two halves of the rows exchanged (its own inverse)."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
