"""Flux's per-block weights: the LoRA Block Weight extension's 61-value Flux vector (its BLOCKIDFLUX, published
in hako-mikan/sd-webui-lora-block-weight scripts/lora_block_weight.py and README, "Support FLUX" 2025-01-23)
and the selectors it implies (`clip`, `t5`, `in` for the embedders, `double3`, `single0-9`, `out` for the final
layer), baked by `merge` into a plain LoRA and composed by generate's Composer on the tiny Flux, checked module
by module against the block each module lies in,
assigned here by hand from the extension's own key rules (its get_flux_blocks)."""

from __future__ import annotations

import pytest
import torch

from difflora.composition.merge import merge_adapters
from difflora.config.blocks import VECTOR_BLOCKS
from difflora.config.spec import parse_adapter_weights
from difflora.formats.reference import reference_model
from difflora.models.families import family as model_family
from tests.support.formats import synthetic_adapter

# The extension's BLOCKIDFLUX, verbatim: D = double-stream block, S = single-stream block.
BLOCKIDFLUX = (
    ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
)
# Its get_flux_blocks, restated on diffusers' module names: clip_l -> CLIP, t5xxl -> T5, double_blocks_N -> DNN,
# single_blocks_N -> SNN, img_in/txt_in/time_in/vector_in/guidance_in -> IN, final_layer -> OUT.
BY_HAND = {
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "CLIP",
    "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": "T5",
    "transformer.x_embedder": "IN",  # img_in
    "transformer.context_embedder": "IN",  # txt_in
    "transformer.time_text_embed.timestep_embedder.linear_1": "IN",  # time_in.in_layer
    "transformer.time_text_embed.guidance_embedder.linear_2": "IN",  # guidance_in.out_layer
    "transformer.time_text_embed.text_embedder.linear_1": "IN",  # vector_in.in_layer
    "transformer.transformer_blocks.0.attn.to_q": "D00",
    "transformer.transformer_blocks.7.ff_context.net.2": "D07",
    "transformer.transformer_blocks.18.attn.to_add_out": "D18",
    "transformer.single_transformer_blocks.0.proj_mlp": "S00",
    "transformer.single_transformer_blocks.21.attn.to_k": "S21",
    "transformer.single_transformer_blocks.37.proj_out": "S37",
    "transformer.norm_out.linear": "OUT",  # final_layer.adaLN_modulation.1
    "transformer.proj_out": "OUT",  # final_layer.linear
}


def test_the_61_vector_is_the_extension_s_flux_order_on_the_family_s_blocks():
    kinds = {"D": "DOUBLE", "S": "SINGLE"}
    names = [f"{kinds[n[0]]}{int(n[1:])}" if n[0] in kinds and n[1:].isdigit() else n for n in BLOCKIDFLUX]
    assert VECTOR_BLOCKS[61] == tuple(names)
    flux = model_family("flux")
    transformer = reference_model("flux", "transformer")
    counts = {kind.upper(): len(transformer.get_submodule(path)) for kind, path in flux.block_lists.items()}
    assert counts == {"DOUBLE": 19, "SINGLE": 38}  # Flux.1's blocks: the vector's D00-D18 and S00-S37


@pytest.fixture(scope="module")
def adapter():
    def select(path: str) -> bool:
        return any(key.partition(".")[2] == path for key in BY_HAND)

    found = synthetic_adapter("flux", rank=2, select=select)
    assert set(found.modules) == set(BY_HAND)  # every module of the table is in the reference model
    return found


@pytest.mark.parametrize(
    "blocks",
    [
        ",".join(f"{i / 8 - 2:g}" for i in range(61)),  # every position its own value
        "in=0.5,out=-1,double=2,double7=3,single20-30=0.25,clip=0,t5=4",
        "base=0.5,single=0",  # base weights both text encoders where no clip/t5 names them
    ],
    ids=["vector", "selectors", "base"],
)
def test_merge_bakes_flux_block_weights_by_the_extension_s_blocks(adapter, blocks):
    (spec,) = parse_adapter_weights(f"x:0.5:2@{blocks}")
    values = [float(v) for v in blocks.split(",")] if "=" not in blocks else None
    rules = dict(item.split("=") for item in blocks.split(",")) if values is None else {}

    def factor(block: str) -> float:  # by hand: the vector's position, or the most specific rule
        if values is not None:
            return values[BLOCKIDFLUX.index(block)]
        kind, index = {"D": "double", "S": "single"}.get(block[0], block.lower()), block[1:]
        if block in ("CLIP", "T5", "IN", "OUT"):
            return float(rules.get(block.lower(), rules.get("base", 1) if block in ("CLIP", "T5") else 1))
        specific = rules.get(f"{kind}{int(index)}")
        ranged = [v for k, v in rules.items() if "-" in k and k.startswith(kind)
                  and int(k[len(kind):].split("-")[0]) <= int(index) <= int(k.split("-")[1])]  # fmt: skip
        return float(specific or (ranged[0] if ranged else rules.get(kind, 1)))

    result = merge_adapters([(spec, adapter)])
    for key, weights in adapter.modules.items():
        weight = (2.0 if key.startswith("text_encoder") else 0.5) * factor(BY_HAND[key])
        if weight == 0:
            assert key not in result.adapter.modules, key
            continue
        merged = result.adapter.modules[key]
        assert torch.allclose(merged.up * merged.scale, weights.up * (weights.scale * weight), atol=1e-7), key


# The tiny Flux (1 double, 1 single block): each module's block by hand, and its factor under TINY_SPEC.
TINY = {
    "transformer.x_embedder": ("IN", 3.0),
    "transformer.context_embedder": ("IN", 3.0),
    "transformer.proj_out": ("OUT", 1.0),  # no selector names it
    "transformer.transformer_blocks.0.attn.to_q": ("D00", 2.0),
    "transformer.single_transformer_blocks.0.proj_mlp": ("S00", 0.25),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ("CLIP", 0.0),
    "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": ("T5", 4.0),
}
TINY_SPEC = "x:0.5:2@in=3,double0=2,single=0.25,clip=0,t5=4"


def test_generate_s_composer_weights_flux_modules_by_their_blocks():
    from difflora.adapter.names import classic_name
    from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
    from difflora.composition.composer import Composer
    from difflora.models.identity import model_identity
    from tests.support.flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    generator = torch.Generator().manual_seed(0)
    modules, base, live = {}, {}, {}
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        for path, module in model.named_modules():
            key = f"{component}.{classic_name(component, path, model)}" if path else ""
            if key in TINY:
                down = torch.randn(2, module.weight.shape[1], generator=generator) * 0.1
                modules[key] = LoraWeights(
                    down, torch.randn(module.weight.shape[0], 2, generator=generator), 1.0
                )
                base[key], live[key] = module.weight.detach().clone(), module
    assert set(modules) == set(TINY)
    identity = model_identity(pipe)
    meta = AdapterMeta(name="x", base_architecture=identity.architecture, base_hash=identity.base_hash)
    composer = Composer(pipe, "fused")
    composer.set(parse_adapter_weights(TINY_SPEC), loader=lambda name: (Adapter(modules, meta), None))
    for key, (_, factor) in TINY.items():
        weight = (2.0 if key.startswith("text_encoder") else 0.5) * factor
        want = base[key].double() + weight * (modules[key].up.double() @ modules[key].down.double()) / 2
        assert torch.allclose(live[key].weight.double(), want, rtol=1e-5, atol=1e-6), key
