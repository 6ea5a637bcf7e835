"""`merge`: exact by rank concatenation (file update = Σ wᵢ·ΔWᵢ) and SVD truncation with the true error."""

from __future__ import annotations

import json

import pytest
import torch

from difflora.composition.composer import compose
from difflora.composition.merge import merge, merge_adapters
from difflora.config.spec import parse_adapter_weights
from difflora.errors import AdapterCompatibilityError, AdapterSpecError
from difflora.formats.native import save_adapter
from difflora.formats.read import load_adapter
from tests.support.adapters import base_weights, module_of, read_file_deltas, write_sample_adapters

SPEC = "style:0.7:0.2,subject:-0.4,detail:1.5"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.support.models import tiny_pipeline

    directory = tmp_path_factory.mktemp("adapters")
    return write_sample_adapters(tiny_pipeline(directory), directory)


def expected_deltas(files, spec: str) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    for entry in parse_adapter_weights(spec):
        for module, delta in read_file_deltas(files[entry.name]).items():
            weight = entry.weight if module.startswith("unet.") else entry.text_encoder_weight
            result[module] = result.get(module, 0) + weight * delta
    return result


def test_exact_merge_file_equals_the_weighted_sum_of_updates(tmp_path, files):
    result = merge(
        parse_adapter_weights(SPEC), tmp_path / "merged.safetensors", adapter_dirs=[files["style"].parent]
    )
    merged_delta = read_file_deltas(tmp_path / "merged.safetensors")  # read back from the file, raw
    expected = expected_deltas(files, SPEC)
    assert merged_delta.keys() == expected.keys()
    for module, want in expected.items():
        assert torch.allclose(merged_delta[module], want, rtol=1e-5, atol=1e-7), module
    ranks = {module: w.rank for module, w in result.adapter.modules.items()}
    assert ranks["unet.down_blocks.0.resnets.0.conv1"] == 8  # detail only
    assert max(ranks.values()) == 4 + 8  # style + detail on to_out.0
    assert "Exact merge" in result.text() and not result.errors


def test_merged_file_is_an_ordinary_adapter_that_composes_like_its_parts(tmp_path, pipeline, files):
    merge(parse_adapter_weights(SPEC), tmp_path / "merged.safetensors", adapter_dirs=[files["style"].parent])
    adapter = load_adapter(tmp_path / "merged.safetensors")
    assert adapter.meta.base_architecture == load_adapter(files["style"]).meta.base_architecture
    sources = json.loads(adapter.meta.extra["difflora.merged_from"])
    assert sources[1] == {"name": "subject", "weight": -0.4, "te_weight": -0.4}
    base = base_weights(pipeline)
    compose(pipeline, parse_adapter_weights("merged:1"), adapter_dirs=[tmp_path])
    merged_weights = {key: module_of(pipeline, key).weight.clone() for key in base}
    compose(pipeline, parse_adapter_weights(SPEC), adapter_dirs=[files["style"].parent])
    for key in base:
        assert torch.allclose(module_of(pipeline, key).weight, merged_weights[key], atol=1e-6), key


def test_svd_merge_reports_the_error_the_test_measures(tmp_path, files):
    result = merge(
        parse_adapter_weights(SPEC), tmp_path / "r3.safetensors", rank=3, adapter_dirs=[files["style"].parent]
    )
    truncated = read_file_deltas(tmp_path / "r3.safetensors")
    expected = expected_deltas(files, SPEC)
    assert set(result.errors) == {
        m for m, w in merge_adapters(_pairs(files)).adapter.modules.items() if w.rank > 3
    }
    for module, want in expected.items():
        error = float((truncated[module] - want).norm() / want.norm())
        if module in result.errors:
            assert result.errors[module] == pytest.approx(error, rel=1e-4, abs=1e-6), module
            assert 0 < error < 1
            best = torch.linalg.svdvals(want.flatten(1))  # Eckart–Young: nothing of rank 3 does better
            assert error == pytest.approx(float(best[3:].norm() / best.norm()), rel=1e-4)
        else:
            assert error < 1e-5, module
    assert "SVD truncation" in result.text() and "rank  12 -> 3" in result.text()


def _pairs(files):
    return [(spec, load_adapter(files[spec.name])) for spec in parse_adapter_weights(SPEC)]


def test_merge_refuses_other_architectures_and_all_zero_weights(tmp_path, files):
    pairs = _pairs(files)
    other = load_adapter(files["subject"])
    other.meta.base_architecture, other.meta.base_model = "sdxl-abc", "sdxl-base"
    with pytest.raises(AdapterCompatibilityError, match="sdxl-base"):
        merge_adapters([pairs[0], (pairs[1][0], other)])
    zero = parse_adapter_weights("style:0,subject:0")
    with pytest.raises(AdapterSpecError, match="Every weight is 0"):
        merge_adapters([(zero[0], pairs[0][1]), (zero[1], pairs[1][1])])
    assert not list(tmp_path.iterdir())


def test_svd_truncation_keeps_conv_shapes(tmp_path, files):
    result = merge(
        parse_adapter_weights("detail:1"),
        tmp_path / "d.safetensors",
        rank=2,
        adapter_dirs=[files["style"].parent],
    )
    conv = result.adapter.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.down.ndim == 4 and conv.up.shape[2:] == (1, 1) and conv.rank == 2
    save_adapter(result.adapter, tmp_path / "again.safetensors")
