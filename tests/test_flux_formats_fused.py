"""The exact split <-> fused LoRA conversion (`difflora.formats.fused`), against ΔW computed by hand."""

from __future__ import annotations

import pytest
import torch

from difflora.adapter.types import LoraWeights
from difflora.formats.fused import FusedLayer, Part, fuse, split

IN = 6
QKV = FusedLayer("blocks.0.qkv", (Part("t.q", 4), Part("t.k", 4), Part("t.v", 4)), IN)
LINEAR1 = FusedLayer("blocks.0.linear1", (*QKV.parts, Part("t.mlp", 10)), IN)


def lora(rows: int, rank: int, alpha: float, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(torch.randn(rank, IN, generator=g), torch.randn(rows, rank, generator=g), alpha)


def delta(weights: LoraWeights) -> torch.Tensor:
    """(alpha / rank) · up @ down, by hand."""
    return (weights.alpha / weights.down.shape[0]) * (weights.up @ weights.down)


def rows_of(layer: FusedLayer, full: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        part.key: full[start:stop]
        for part, (start, stop) in zip(layer.parts, layer.row_ranges(), strict=True)
    }


@pytest.mark.parametrize("layer", [QKV, LINEAR1], ids=["qkv", "linear1"])
def test_fusing_concatenates_downs_and_keeps_every_parts_update(layer):
    parts = {p.key: lora(p.rows, rank=2 + i, alpha=1.5 * (2 + i), seed=i) for i, p in enumerate(layer.parts)}
    fused = fuse(layer, parts)
    assert fused.rank == sum(w.rank for w in parts.values())  # rank grows x3 / x4 (here 2+3+4(+5))
    assert fused.scale == pytest.approx(1.5)  # alpha / rank keeps the parts' scale
    assert torch.equal(fused.down, torch.cat([parts[p.key].down for p in layer.parts]))
    for key, rows in rows_of(layer, delta(fused)).items():
        torch.testing.assert_close(rows, delta(parts[key]), rtol=1e-6, atol=1e-6)


def test_parts_without_a_lora_get_zero_rows():
    parts = {"t.q": lora(4, 2, 4.0, 0), "t.v": lora(4, 2, 4.0, 1)}
    fused = fuse(QKV, parts)
    assert fused.rank == 4 and fused.up[4:8].abs().sum() == 0
    by_part = rows_of(QKV, delta(fused))
    torch.testing.assert_close(by_part["t.q"], delta(parts["t.q"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_part["t.v"], delta(parts["t.v"]), rtol=1e-6, atol=1e-6)


def test_parts_with_different_scales_fold_the_ratio_into_their_rows():
    parts = {"t.q": lora(4, 2, 2.0, 0), "t.k": lora(4, 2, 8.0, 1), "t.v": lora(4, 4, 1.0, 2)}
    fused = fuse(QKV, parts)
    for key, rows in rows_of(QKV, delta(fused)).items():
        torch.testing.assert_close(rows, delta(parts[key]), rtol=1e-6, atol=1e-6)


def test_a_block_sparse_up_splits_into_the_parts_own_ranks():
    parts = {p.key: lora(p.rows, rank=3, alpha=6.0, seed=i) for i, p in enumerate(LINEAR1.parts)}
    back = split(LINEAR1, fuse(LINEAR1, parts))
    assert set(back) == set(parts)
    for key, weights in back.items():
        assert weights.rank == 3 and torch.equal(weights.down, parts[key].down)
        torch.testing.assert_close(delta(weights), delta(parts[key]), rtol=1e-6, atol=1e-6)


def test_a_dense_up_shares_the_down_and_splits_the_up_by_rows():
    g = torch.Generator().manual_seed(5)
    fused = LoraWeights(torch.randn(8, IN, generator=g), torch.randn(12, 8, generator=g), alpha=4.0)
    back = split(QKV, fused)
    expected = rows_of(QKV, 0.5 * (fused.up @ fused.down))
    for key, weights in back.items():
        assert weights.rank == 8 and torch.equal(weights.down, fused.down)
        torch.testing.assert_close(delta(weights), expected[key], rtol=0, atol=0)


def test_a_part_with_zero_rows_in_a_sparse_up_gets_no_lora():
    parts = {"t.q": lora(4, 2, 4.0, 0), "t.k": lora(4, 2, 4.0, 1)}
    assert set(split(QKV, fuse(QKV, parts))) == {"t.q", "t.k"}


def test_swapped_halves_are_written_swapped_and_read_back():
    layer = FusedLayer("final", (Part("t.norm_out", 8),), IN, swap_halves=True)
    weights = lora(8, 2, 3.0, 0)
    fused = fuse(layer, {"t.norm_out": weights})
    torch.testing.assert_close(delta(fused), torch.cat([delta(weights)[4:], delta(weights)[:4]]))
    torch.testing.assert_close(delta(split(layer, fused)["t.norm_out"]), delta(weights))
