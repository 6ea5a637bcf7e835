"""Composition meets its contract, W = W0 + Σ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ, for every adapted module, in both modes.

The expected weights are computed here from the tensors read out of the adapter files with safetensors
directly (alpha from the header's `lora_adapter_metadata`, matched with its regex patterns), not with
difflora's loader. Three adapters differ in rank, alpha and targets; one has a per-module rank/alpha; one
adapts a Conv2d; the spec has a negative weight and a text-encoder weight different from the UNet weight.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from difflora.adapter.names import adaptable_modules, classic_name
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.composition.composer import Composer, compose
from difflora.config.spec import parse_adapter_weights
from difflora.formats.native import save_adapter
from difflora.generation.pipeline import render
from difflora.models.identity import model_identity
from tests.conftest import tiny_pipeline

SPEC = "style:0.8:0.3,subject:-0.6,detail:1.3"
CONV = "down_blocks.0.resnets.0.conv1"


def random_adapter(pipe, *, seed, unet, te=(), rank=4, alpha=4.0, odd=None, scale=0.2, name="") -> Adapter:
    """Random A/B for the modules whose names end with one of `unet` / `te`. `odd` = (suffix, rank, alpha)
    gives the first module with that suffix its own rank and alpha."""
    generator = torch.Generator().manual_seed(seed)
    identity = model_identity(pipe)
    modules = {}
    for component, suffixes in (("unet", unet), ("text_encoder", te)):
        model = getattr(pipe, component)
        for live, module in adaptable_modules(model).items():
            if not any(live == s or live.endswith("." + s) for s in suffixes):
                continue
            r, a = rank, alpha
            if (
                odd
                and live.endswith(odd[0])
                and not any(k.endswith(odd[0]) and w.rank != rank for k, w in modules.items())
            ):
                r, a = odd[1], odd[2]
            shape = module.weight.shape
            down = torch.randn(r, *shape[1:], generator=generator) * scale
            up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=generator) * scale
            modules[f"{component}.{classic_name(component, live, model)}"] = LoraWeights(down, up, a)
    meta = AdapterMeta(name=name, base_architecture=identity.architecture, base_hash=identity.base_hash)
    return Adapter(modules, meta)


def write_sample_adapters(pipe, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    adapters = {
        "style": random_adapter(
            pipe,
            seed=1,
            unet=("to_q", "to_k", "to_v", "to_out.0"),
            te=("q_proj", "v_proj"),
            rank=4,
            alpha=2.0,
        ),
        "subject": random_adapter(
            pipe,
            seed=2,
            unet=("to_k", "to_v"),
            te=("k_proj", "v_proj"),
            rank=2,
            alpha=8.0,
            odd=("to_v", 3, 1.5),
        ),
        "detail": random_adapter(pipe, seed=3, unet=("to_out.0", CONV), rank=8, alpha=8.0),
    }
    return {name: save_adapter(a, directory / f"{name}.safetensors") for name, a in adapters.items()}


def read_file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """module key -> (α/r)·B·A from the raw file: tensors via safe_open, alpha via the header's regexes."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    deltas = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        down, up = tensors[key].double(), tensors[module + ".lora_B.weight"].double()
        component, _, name = module.partition(".")
        peft_name = name.removeprefix("text_model.")
        alpha = config[f"{component}.lora_alpha"]
        for pattern, value in config.get(f"{component}.alpha_pattern", {}).items():
            if re.fullmatch(pattern, peft_name):
                alpha = value
        rank = down.shape[0]
        delta = (alpha / rank) * (up.flatten(1) @ down.flatten(1))
        deltas[module] = delta.reshape(up.shape[0], *down.shape[1:])
    return deltas


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


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """W0 of every adaptable module, keyed like adapter modules (component.classic name)."""
    result = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for live, module in adaptable_modules(model).items():
            result[f"{component}.{classic_name(component, live, model)}"] = module.weight.detach().clone()
    return result


def module_of(pipe, key: str):
    component, _, classic = key.partition(".")
    model = getattr(pipe, component)
    return model.get_submodule(classic.removeprefix("text_model.") if component != "unet" else classic)


def effective_forward_error(module, weight: torch.Tensor) -> float:
    """max |module(x) - x·Wᵀ - b| on random inputs: the effective weight of a peft (dynamic) layer."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if weight.ndim == 4:
            x = torch.randn(2, weight.shape[1], 8, 8, generator=generator)
            expected = F.conv2d(x.double(), weight, base.bias.double(), base.stride, base.padding)
        else:
            x = torch.randn(5, weight.shape[1], generator=generator)
            expected = F.linear(x.double(), weight, base.bias.double() if base.bias is not None else None)
        return float((module(x).double() - expected).abs().max())


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
