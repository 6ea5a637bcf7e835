"""`difflora merge --into-base`: where each module lives in the original file (against the test support's own
diffusers -> ldm/sgm name table, OpenCLIP's fused q/k/v rows included), the baked tensors against W0 + Σ wᵢΔWᵢ
computed from the adapter files, and (slow) a full-size SD 1.5 file: baked, loaded by diffusers'
from_single_file, generating what the base generates with the adapters fused."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from difflora.adapter.names import adaptable_modules, classic_name
from difflora.adapter.types import Adapter, LoraWeights
from difflora.cli import cli
from difflora.composition.bake import Source, bake_tensors, ldm_sources
from difflora.errors import ConfigError
from difflora.formats.native import save_adapter
from difflora.formats.reference import reference_model
from tests.support.checkpoints import checkpoint_entries, write_header_only


def _expected_sources(family: str) -> dict[str, tuple[str, int]]:
    """difflora module key -> (original key, index of its part in that tensor), from the support's table."""
    expected = {}
    adaptable = {}
    for entry in checkpoint_entries(family):
        if entry.component not in ("unet", "text_encoder", "text_encoder_2") or not entry.key.endswith(
            "weight"
        ):
            continue
        model = reference_model(family, entry.component)
        if entry.component not in adaptable:
            adaptable[entry.component] = set(adaptable_modules(model))
        for part, param in enumerate(entry.params):
            live = param.removesuffix(".weight")
            if live in adaptable[entry.component]:
                expected[f"{entry.component}.{classic_name(entry.component, live, model)}"] = (
                    entry.key,
                    part,
                )
    return expected


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_adaptable_module_is_found_where_the_file_holds_it(family):
    shapes = {e.key: e.shape for e in checkpoint_entries(family)}
    expected = _expected_sources(family)
    models = {c: reference_model(family, c) for c in {k.partition(".")[0] for k in expected}}
    found = ldm_sources(shapes, models, "unet", sorted(expected))
    assert len(found) == len(expected) > 100
    for module, (key, part) in expected.items():
        source, shape = found[module]
        assert source.key == key, module
        rows = shape[0]  # a fused in_proj holds q, k, v one after the other
        assert torch.equal(source.rows, torch.arange(part * rows, (part + 1) * rows)), module


def test_baked_tensors_are_w0_plus_the_weighted_updates_rounded_once():
    g = torch.Generator().manual_seed(0)
    w0 = {"fused": torch.randn(12, 5, generator=g).half(), "plain": torch.randn(4, 5, generator=g).half()}
    sources = {
        "unet.k": (Source("fused", torch.arange(4, 8)), (4, 5)),
        "unet.p": (Source("plain", torch.arange(4)), (4, 5)),
    }
    a = LoraWeights(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), alpha=1.0)
    b = LoraWeights(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g), alpha=6.0)
    merged = Adapter({"unet.k": a, "unet.p": b})
    tensors = dict(w0)
    result = bake_tensors(tensors, sources, merged)
    expected_fused = w0["fused"].float().clone()
    expected_fused[4:8] += 0.5 * a.up @ a.down
    assert torch.equal(tensors["fused"], expected_fused.half())
    assert torch.equal(tensors["plain"], (w0["plain"].float() + 2.0 * b.up @ b.down).half())
    assert result.tensors == {"fused": 4, "plain": 4}
    assert torch.equal(tensors["fused"][:4], w0["fused"][:4]) and torch.equal(
        tensors["fused"][8:], w0["fused"][8:]
    )


def test_into_base_refuses_rank_and_a_non_checkpoint(tmp_path):
    result = CliRunner().invoke(
        cli, ["merge", "a", "--into-base", "x.safetensors", "--rank", "4", "-o", "o.safetensors"]
    )
    assert result.exit_code != 0 and "a baked base holds the exact update" in result.output
    with pytest.raises(ConfigError, match="into_base|into-base"):
        from difflora.config.merge import MergeConfig

        MergeConfig(adapters=("a",), output="o.safetensors", into_base="model.ckpt")
    adapter = tmp_path / "a.safetensors"
    save_adapter(Adapter({"unet.x": LoraWeights(torch.ones(1, 2), torch.ones(2, 1), 1.0)}), adapter)
    header_only = tmp_path / "sd1.safetensors"
    write_header_only(header_only, "sd1")
    out = tmp_path / "o.safetensors"
    refused = CliRunner().invoke(
        cli, ["merge", str(adapter), "--into-base", str(header_only), "-o", str(out)]
    )
    assert refused.exit_code != 0 and "unet.x is not a weight of this base file's unet" in refused.output
    assert not out.exists()
