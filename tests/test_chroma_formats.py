"""Chroma LoRA files: export in kohya's names (the original layout, q/k/v and the single blocks' MLP input
fused exactly as for Flux, the approximator by its original names) and in diffusers' `transformer.*`
layout; every exported key placed by ComfyUI's rules; re-import with the same ΔW; import of kohya,
diffusers (PEFT with its metadata) and ai-toolkit Chroma files.

ComfyUI's Chroma model class subclasses its Flux one (comfy/model_base.py `class Chroma(Flux)`), so
`model_lora_keys_unet` maps a Chroma model as a Flux one: every original weight by `lora_unet_<flat>` and
`diffusion_model.<path>`, and `flux_to_diffusers`'s diffusers names (which know no approximator) sliced into
the fused weights; `tests/support/comfyui_flux.py` restates those rules. A small random diffusers Chroma
transformer (`tests.support.chroma`) carries a peft LoRA on every Linear, the reference for every ΔW."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from difflora.adapter.types import Adapter
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.export import export_bytes
from difflora.formats.kohya import to_kohya
from difflora.formats.naming import build_table
from difflora.formats.read import parse_state_dict
from difflora.formats.reference import adaptable
from tests.support import comfyui_flux as comfy
from tests.support import flux_files
from tests.support.adapters import peft_adapter, peft_deltas, randomise_lora
from tests.support.chroma import tiny_chroma_transformer
from tests.support.flux_model import base_weights

# Every Linear of a Chroma transformer, as peft target suffixes (the approximator's in_proj, out_proj and
# its layers' linear_1 / linear_2 included; Chroma has no modulation Linears).
ALL_LINEAR = (
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
    "x_embedder",
    "context_embedder",
    "in_proj",
    "out_proj",
    "linear_1",
    "linear_2",
)
APPROXIMATOR = "distilled_guidance_layer."


def _lora_model(seed: int = 1) -> nn.Module:
    model = tiny_chroma_transformer()
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6.0, target_modules=list(ALL_LINEAR)), model)
    randomise_lora(model, seed)
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _lora_model()


def _adapter(model: nn.Module) -> Adapter:
    return peft_adapter(model, family="chroma")


def original_name(path: str) -> str:
    """The approximator's original name of a diffusers path (comfy/ldm/chroma/layers.py's Approximator)."""
    return path.replace(".linear_1", ".in_layer").replace(".linear_2", ".out_layer")


def _table(model: nn.Module) -> dict[str, comfy.Target]:
    return comfy.diffusers_to_bfl(dict(model.config), model.single_transformer_blocks[0].mlp_hidden_dim)


def original_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original checkpoint's weights (with `diffusion_model.`) from diffusers' (path -> W)."""
    blocks = comfy.bfl_weights(weights, _table(model))
    approximator = {
        f"diffusion_model.{original_name(path)}.weight": w
        for path, w in weights.items()
        if path.startswith(APPROXIMATOR)
    }
    return blocks | approximator


def comfyui_result(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, set[str]]:
    """(ComfyUI's patched weights, the original weights of W0 + peft's ΔW, keys ComfyUI does not load)."""
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    base = base_weights(model)
    w0 = original_weights(model, base)
    patches, not_loaded = comfy.load_lora(tensors, comfy.lora_key_map(list(w0), _table(model), hidden))
    deltas = peft_deltas(model)
    expected = original_weights(model, {k: w + deltas.get(f"transformer.{k}", 0) for k, w in base.items()})
    return comfy.patched(w0, patches), expected, not_loaded


def _tables(model: nn.Module):
    return [build_table("chroma", {"transformer": adaptable("transformer", model)})]


def test_kohya_export_names_every_original_layer_and_comfyui_makes_the_same_weights(model):
    adapter = _adapter(model)
    tensors, metadata = to_kohya(
        adapter, dtype=torch.float32, modules={"transformer": adaptable("transformer", model)}
    )
    fused = {
        bfl.removesuffix(".weight")
        for key, (bfl, _, _) in _table(model).items()
        if f"transformer.{key.removesuffix('.weight')}" in adapter.modules
    }
    approximator = {
        original_name(k.removeprefix("transformer."))
        for k in adapter.modules
        if k.startswith("transformer." + APPROXIMATOR)
    }
    assert len(approximator) == 2 + 2 * 5  # in_proj, out_proj, 5 x (in_layer, out_layer)
    expected = {"lora_unet_" + name.replace(".", "_") for name in fused | approximator}
    assert {key.split(".")[0] for key in tensors} == expected
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up, alpha each
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 9  # 3 ranks stacked
    assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 12  # q, k, v, MLP
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == (
        "chroma",
        "chroma/lora",
    )
    patched, want, not_loaded = comfyui_result(model, tensors)
    assert not not_loaded
    w0 = original_weights(model, base_weights(model))
    assert all(not torch.equal(w0[k], want[k]) for k in want)  # every weight is adapted
    errors = {k: float((patched[k] - want[k]).norm() / want[k].norm()) for k in want}
    assert max(errors.values()) < 1e-5, errors  # the fused update equals the split ones to float32 rounding


def test_diffusers_layout_loads_into_chroma_with_the_same_updates(model, tmp_path):
    """ChromaPipeline's LoRA loader is FluxLoraLoaderMixin: its state dict loads into a fresh Chroma."""
    path = tmp_path / "chroma.diffusers.safetensors"
    path.write_bytes(export_bytes(_adapter(model), "diffusers", torch.float32))
    state_dict, metadata = FluxLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    assert all(key.startswith("transformer.") for key in state_dict)
    fresh = tiny_chroma_transformer()
    fresh.load_lora_adapter(state_dict, prefix="transformer", metadata=metadata, adapter_name="file")
    loaded = {
        f"transformer.{name}": module.get_delta_weight("file")
        for name, module in fresh.named_modules()
        if "file" in getattr(module, "lora_A", {})
    }
    deltas = peft_deltas(model)
    assert set(loaded) == set(deltas)
    for key, delta in loaded.items():
        torch.testing.assert_close(delta, deltas[key], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_difflora_exports_reimport_with_every_key_and_the_same_updates(model, layout, tmp_path):
    original = _adapter(model)
    live = {"transformer": adaptable("transformer", model)}
    if layout == "kohya":
        tensors, metadata = to_kohya(original, dtype=torch.float32, modules=live)
    else:
        path = tmp_path / "chroma.safetensors"
        path.write_bytes(export_bytes(original, "diffusers", torch.float32))
        with safe_open(str(path), "pt") as opened:  # the alpha is in the header's PEFT metadata
            tensors = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118
            metadata = opened.metadata()
    adapter = parse_state_dict(tensors, metadata, source=f"{layout}.safetensors", tables=_tables(model))
    assert set(adapter.modules) == set(original.modules)
    for key, weights in adapter.modules.items():
        assert torch.equal(weights.delta(), original.modules[key].delta()), key
    if layout == "kohya":
        assert adapter.meta.base_family == "chroma"


def _kohya_file(adapter: Adapter, model: nn.Module) -> dict[str, torch.Tensor]:
    """kohya's Chroma file, written independently: Flux's fused layers (`flux_files`, from ComfyUI's table)
    and the approximator's layers by their original names."""
    tensors = flux_files.kohya_file(adapter, model)
    for key, w in adapter.modules.items():
        if key.startswith("transformer." + APPROXIMATOR):
            name = "lora_unet_" + original_name(key.removeprefix("transformer.")).replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": w.down, f"{name}.lora_up.weight": w.up}
            tensors[f"{name}.alpha"] = torch.tensor(w.alpha)
    return tensors


LAYOUTS = {
    "kohya": lambda adapter, model: (_kohya_file(adapter, model), {}),
    "diffusers": lambda adapter, model: flux_files.simpletuner_file(adapter),  # PEFT keys + their header
    "ai-toolkit": lambda adapter, model: (flux_files.ai_toolkit_file(adapter), {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_trainers_chroma_files_import_with_the_same_updates(model, layout):
    tensors, metadata = LAYOUTS[layout](_adapter(model), model)
    adapter = parse_state_dict(tensors, metadata, source=f"{layout}.safetensors", tables=_tables(model))
    deltas = peft_deltas(model)
    assert set(adapter.modules) == set(deltas)
    for key, weights in adapter.modules.items():
        torch.testing.assert_close(weights.delta(), deltas[key], rtol=1e-5, atol=1e-6)


def test_consumer_verdicts_follow_comfyuis_rules_for_both_layouts():
    """On the full-size tree: the kohya export loads whole in ComfyUI; the diffusers layout's approximator
    keys are not ComfyUI's (its `flux_to_diffusers` has no approximator), its blocks' keys are."""
    from difflora.adapter.types import AdapterMeta, LoraWeights
    from difflora.formats.reference import reference_modules

    modules = reference_modules("chroma", "transformer")
    chosen = [
        p
        for p in modules
        if p.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.", APPROXIMATOR + "in_proj"))
    ]
    g = torch.Generator().manual_seed(0)
    adapter = Adapter(
        {
            f"transformer.{p}": LoraWeights(
                torch.randn(2, modules[p].in_features, generator=g),
                torch.randn(modules[p].out_features, 2, generator=g),
                2.0,
            )
            for p in chosen
        },
        AdapterMeta(name="full", base_family="chroma"),
    )
    tensors, metadata = to_kohya(adapter)
    by_consumer = {v.consumer: v for v in verdicts(list(tensors), metadata, "chroma")}
    assert set(by_consumer) == {"ComfyUI", "diffusers"}
    assert by_consumer["ComfyUI"].loaded == len(tensors)
    peft = load_safetensors_bytes(export_bytes(adapter, "diffusers", torch.float32))
    comfyui = next(v for v in verdicts(list(peft), {}, "chroma") if v.consumer == "ComfyUI")
    approximator = [k for k in peft if k.startswith("transformer." + APPROXIMATOR)]
    assert len(approximator) == 2 and set(comfyui.dropped) == set(approximator)
    diffusers = next(v for v in verdicts(list(peft), {}, "chroma") if v.consumer == "diffusers")
    assert diffusers.loaded == len(peft)


@pytest.mark.parametrize(
    ("approximator", "metadata", "expected"),
    [(False, True, "chroma"), (True, False, "chroma"), (False, False, "flux")],
    ids=["metadata", "approximator-keys", "neither"],
)
def test_a_kohya_file_is_chromas_by_its_metadata_or_its_approximator_keys(approximator, metadata, expected):
    """Chroma's blocks have Flux's names and shapes: a file says it is Chroma's by its metadata or by a key
    only Chroma has; an attention-only file with neither is read as Flux.1 (the first family it fits)."""
    from difflora.adapter.types import AdapterMeta, LoraWeights
    from difflora.formats.reference import reference_modules

    modules = reference_modules("chroma", "transformer")
    roots = ("transformer_blocks.0.attn.to_", *((APPROXIMATOR + "in_proj",) if approximator else ()))
    g = torch.Generator().manual_seed(1)
    adapter = Adapter(
        {
            f"transformer.{p}": LoraWeights(
                torch.randn(2, modules[p].in_features, generator=g),
                torch.randn(modules[p].out_features, 2, generator=g),
                2.0,
            )
            for p in modules
            if p.startswith(roots)
        },
        AdapterMeta(name="x", base_family="chroma"),
    )
    tensors, written = to_kohya(adapter)
    read = parse_state_dict(tensors, written if metadata else {}, source="k.safetensors")
    assert read.meta.base_family == expected
    assert set(read.modules) == set(adapter.modules)
