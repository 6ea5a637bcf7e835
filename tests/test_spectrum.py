"""`difflora inspect --spectrum`: the factor-based spectrum against the dense ΔW's, the rank a low-rank
update needs, the measured merge claim against a merge actually run, and the heat map's cells."""

from __future__ import annotations

import re

import torch
from click.testing import CliRunner
from PIL import Image

from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.cli import cli
from difflora.composition.spectrum import adapter_spectrum, kept_energy, singular_values, summarise
from difflora.composition.spectrum_map import CELL, FONT_SIZE, colour, draw_spectrum_map, energy_shares
from difflora.formats.native import save_adapter
from tests.support.adapters import CONV, random_adapter
from tests.support.models import tiny_pipeline


def _low_rank_content(out: int, inp: int, trained: int, content: int, seed: int) -> LoraWeights:
    """A rank-`trained` module whose ΔW = scale·B·A has rank `content` with singular values content..1:
    B = U·M and A = M⁺·diag(s)·Vᵀ (M random content×trained, M·M⁺ = I), so B·A = U·diag(s)·Vᵀ."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, content, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, content, generator=g, dtype=torch.float64))[0]
    m = torch.randn(content, trained, generator=g, dtype=torch.float64)
    s = torch.arange(content, 0, -1, dtype=torch.float64)
    return LoraWeights(
        down=(torch.linalg.pinv(m) @ torch.diag(s) @ v.T).float(), up=(u @ m).float(), alpha=trained
    )


def test_spectrum_equals_the_dense_svd(tmp_path):
    adapter = random_adapter(tiny_pipeline(tmp_path), seed=5, unet=("to_q", CONV), te=("q_proj",), alpha=3.0)
    assert any(w.down.ndim == 4 for w in adapter.modules.values())  # a conv module is covered too
    for layer in adapter_spectrum(adapter):
        weights = adapter.modules[layer.module]
        dense = (weights.up.double().flatten(1) @ weights.down.double().flatten(1)) * (3.0 / weights.rank)
        expected = torch.linalg.svdvals(dense)[: weights.rank]
        assert torch.allclose(torch.tensor(layer.singular_values, dtype=torch.float64), expected, rtol=1e-9)


def test_rank_16_adapter_with_rank_3_content_needs_3():
    modules = {f"unet.layer{i}": _low_rank_content(48, 40, 16, 3, seed=i) for i in range(6)}
    adapter = Adapter(modules, AdapterMeta(name="style"))
    layers = adapter_spectrum(adapter)
    # energies 9, 4, 1 of 14: two components keep 92.9% (>= 90%), three are needed for 99%
    assert all((layer.rank_for(0.90), layer.rank_for(0.99)) == (2, 3) for layer in layers)
    for layer in layers:  # s = 3, 2, 1, then float32 rounding of the factors
        assert torch.allclose(
            torch.tensor(layer.singular_values[:3]), torch.tensor([3.0, 2.0, 1.0]), atol=1e-5
        )
        assert max(layer.singular_values[3:]) < 1e-5
    summary = summarise(adapter, layers)
    assert (summary.trained_rank, summary.proposed_rank) == (16, 3)
    assert abs(summary.kept - 1.0) < 1e-12  # rank 3 loses nothing of a rank-3 update


def test_rank_for_counts_energy_by_hand():
    # s = 3, 2, 1 -> energies 9, 4, 1 of 14: 9/14 = 64%, 13/14 = 92.9%, 100%
    weights = LoraWeights(down=torch.diag(torch.tensor([3.0, 2.0, 1.0])), up=torch.eye(3), alpha=3.0)
    (layer,) = adapter_spectrum(Adapter({"unet.x": weights}))
    assert [round(s, 12) for s in layer.singular_values] == [3.0, 2.0, 1.0]
    assert (layer.rank_for(0.6), layer.rank_for(0.9), layer.rank_for(0.99)) == (1, 2, 3)


def test_kept_energy_matches_a_merge_measured_densely(tmp_path):
    from difflora.composition.merge import merge_adapters
    from difflora.config.spec import AdapterWeight

    adapter = random_adapter(tiny_pipeline(tmp_path), seed=7, unet=("to_k", "to_v"), rank=4, alpha=2.0)
    merged = merge_adapters([(AdapterWeight("a"), adapter)], rank=2).adapter
    total = lost = 0.0
    for key, weights in adapter.modules.items():
        dense = weights.low_rank_delta().double()
        total += float(dense.pow(2).sum())
        lost += float((dense - merged.modules[key].low_rank_delta().double()).pow(2).sum())
    assert abs(kept_energy(adapter, 2) - (1 - lost / total)) < 1e-6


def test_inspect_spectrum_cli_claim_is_what_the_merge_keeps(tmp_path):
    modules = {f"unet.layer{i:02d}": _low_rank_content(32, 24, 8, 2, seed=i) for i in range(20)}
    g = torch.Generator().manual_seed(9)  # one full-rank layer: the proposed rank then loses something
    modules["unet.noisy"] = LoraWeights(torch.randn(8, 24, generator=g), torch.randn(32, 8, generator=g), 8.0)
    path = save_adapter(Adapter(modules, AdapterMeta(name="style")), tmp_path / "style.safetensors")
    heat = tmp_path / "map.png"
    result = CliRunner().invoke(cli, ["inspect", str(path), "--spectrum-map", str(heat)])
    assert result.exit_code == 0, result.output
    assert "rank 8 trained; 95% of layers need <= 2 for 99%" in result.output
    command = re.search(r"`difflora (merge .*?)` keeps ([0-9.]+)% \(measured\)", result.output)
    assert command, result.output
    args = command.group(1).split()
    assert args[:4] == ["merge", f"{path}:1", "--rank", "2"] and args[5] == "style-r2.safetensors"
    out = tmp_path / "style-r2.safetensors"
    merged = CliRunner().invoke(cli, [*args[:5], str(out)])
    assert merged.exit_code == 0, merged.output
    from difflora.formats.read import load_adapter

    small = load_adapter(out)
    total = kept = 0.0
    for key, weights in modules.items():
        dense = weights.low_rank_delta().double()
        total += float(dense.pow(2).sum())
        kept += float(small.modules[key].low_rank_delta().double().pow(2).sum())
    assert abs(100 * kept / total - float(command.group(2))) < 0.05  # printed to one decimal
    drawn = draw_spectrum_map(adapter_spectrum(load_adapter(path)))
    assert drawn.height == FONT_SIZE + 6 + 21 * CELL + 2  # a row per layer under the component numbers
    assert Image.open(heat).convert("RGB").tobytes() == drawn.tobytes()


def test_heat_map_cells_are_each_components_energy_share():
    modules = {
        "unet.a": _low_rank_content(16, 12, 4, 2, seed=1),
        "unet.bb": _low_rank_content(16, 12, 4, 4, 2),
    }
    layers = adapter_spectrum(Adapter(modules))
    image = draw_spectrum_map(layers)
    label_w = image.width - 4 * CELL - 2
    for row, layer in enumerate(layers):
        for k, share in enumerate(energy_shares(layer)):
            pixel = image.getpixel((label_w + k * CELL + CELL // 2, FONT_SIZE + 6 + row * CELL + CELL // 2))
            assert pixel == colour(share)
    total = sum(energy_shares(layers[0]))
    assert abs(total - 1.0) < 1e-9 and singular_values(modules["unet.a"]).shape == (4,)
