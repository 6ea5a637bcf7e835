"""Composition meets its contract, W = W0 + Σ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ, for every adapted module, in both modes.

The expected weights are computed here from the tensors read out of the adapter files with safetensors
directly (alpha from the header's `lora_adapter_metadata`, matched with its regex patterns), not with
difflora's loader. Three adapters differ in rank, alpha and targets; one has a per-module rank/alpha; one
adapts a Conv2d; the spec has a negative weight and a text-encoder weight different from the UNet weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difflora.composition.composer import Composer, compose
from difflora.config.spec import parse_adapter_weights
from difflora.generation.pipeline import render
from tests.support.adapters import (
    CONV,
    base_weights,
    effective_forward_error,
    module_of,
    read_file_deltas,
    write_sample_adapters,
)
from tests.support.models import tiny_pipeline

SPEC = "style:0.8:0.3,subject:-0.6,detail:1.3"


def expected_weights(
    base: dict[str, torch.Tensor], files: dict[str, Path], spec: str
) -> dict[str, torch.Tensor]:
    """module key -> W0 + Σ wᵢ ΔWᵢ (float64), for every module adapted by some adapter of the spec."""
    result: dict[str, torch.Tensor] = {}
    for entry in parse_adapter_weights(spec):
        for module, delta in read_file_deltas(files[entry.name]).items():
            weight = entry.weight if module.startswith("unet.") else entry.text_encoder_weight
            result.setdefault(module, base[module].double().clone())
            result[module] += weight * delta
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("adapters")
    return write_sample_adapters(tiny_pipeline(directory), directory)


@pytest.fixture
def adapter_dir(files) -> Path:
    return next(iter(files.values())).parent


@pytest.mark.parametrize("cache_bytes", [2**31, 0], ids=["cached-deltas", "deltas-on-the-fly"])
def test_fused_weights_equal_the_contract_computed_from_the_files(pipeline, files, adapter_dir, cache_bytes):
    base = base_weights(pipeline)
    composer = Composer(pipeline, "fused", adapter_dirs=[adapter_dir], delta_cache_bytes=cache_bytes)
    composer.set(parse_adapter_weights(SPEC))
    expected = expected_weights(base, files, SPEC)
    assert CONV in " ".join(expected) and any(k.startswith("text_encoder.") for k in expected)
    for key, want in expected.items():
        got = module_of(pipeline, key).weight.double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), key
    for key, w0 in base.items():
        if key not in expected:
            assert torch.equal(module_of(pipeline, key).weight, w0), f"{key} is adapted by nobody but changed"


def test_dynamic_forward_equals_the_contract(pipeline, files, adapter_dir):
    base = base_weights(pipeline)
    compose(pipeline, parse_adapter_weights(SPEC), mode="dynamic", adapter_dirs=[adapter_dir])
    expected = expected_weights(base, files, SPEC)
    for key, want in expected.items():
        module = module_of(pipeline, key)
        assert type(module).__module__.startswith("peft"), key
        assert effective_forward_error(module, want) < 1e-4, key


def test_weight_zero_gives_the_base_model_bitwise_in_fused_mode(pipeline, adapter_dir):
    base_image = render(pipeline, ["a red circle"], seeds=[7], steps=3)[0]
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    compose(pipeline, parse_adapter_weights("style:0,subject:0:0,detail:0"), adapter_dirs=[adapter_dir])
    assert all(torch.equal(v, base[k]) for k, v in pipeline.unet.state_dict().items())
    image = render(pipeline, ["a red circle"], seeds=[7], steps=3)[0]
    assert np.array_equal(np.asarray(image), np.asarray(base_image))
    compose(pipeline, parse_adapter_weights("style:1"), adapter_dirs=[adapter_dir])
    assert not np.array_equal(
        np.asarray(render(pipeline, ["a red circle"], seeds=[7], steps=3)[0]), np.asarray(base_image)
    )


@pytest.mark.parametrize("mode", ["fused", "dynamic"])
def test_100_cycles_of_compose_reweight_remove_leave_w0_bit_identical(pipeline, adapter_dir, mode):
    state = {
        c: {k: v.clone() for k, v in getattr(pipeline, c).state_dict().items()}
        for c in ("unet", "text_encoder")
    }
    composer = compose(pipeline, parse_adapter_weights(""), mode=mode, adapter_dirs=[adapter_dir])
    rng = np.random.default_rng(0)
    for cycle in range(100 if mode == "fused" else 20):
        composer.set(
            parse_adapter_weights(f"style:{rng.normal():.3f},subject:{rng.normal():.3f}:{rng.normal():.3f}")
        )
        composer.set_weights(parse_adapter_weights(f"style:{rng.normal():.3f}"))
        composer.load(parse_adapter_weights(f"detail:{rng.normal():.3f}")[0])
        composer.remove("subject")
        if cycle % 10 == 9:
            composer.clear()
    composer.clear()
    for component, before in state.items():
        after = getattr(pipeline, component).state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), component


def test_fused_and_dynamic_render_the_same_image(tmp_path, adapter_dir):
    images = []
    for mode in ("fused", "dynamic"):
        pipe = tiny_pipeline(tmp_path / mode)
        compose(pipe, parse_adapter_weights(SPEC), mode=mode, adapter_dirs=[adapter_dir])
        images.append(np.asarray(render(pipe, ["a blue square"], seeds=[3], steps=3)[0], dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_composing_again_replaces_the_set_from_the_original_weights(pipeline, files, adapter_dir):
    base = base_weights(pipeline)
    compose(pipeline, parse_adapter_weights("style:1,detail:-2"), adapter_dirs=[adapter_dir])
    composer = compose(pipeline, parse_adapter_weights("subject:0.5"), adapter_dirs=[adapter_dir])
    assert [str(a) for a in composer.adapters] == ["subject:0.5"]
    expected = expected_weights(base, files, "subject:0.5")
    for key, w0 in base.items():
        want = expected.get(key, w0.double())
        assert torch.allclose(module_of(pipeline, key).weight.double(), want, rtol=1e-5, atol=1e-6), key
