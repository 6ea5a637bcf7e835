"""`difflora export style.safetensors:0.8@out=1,in=0`: an adapter with its spec's weights and block weights
baked in, module by module, each module keeping its kind (a LoRA stays a LoRA of the same rank, a LoKr a
LoKr): the written file, loaded at strength 1 by ComfyUI or A1111/Forge, is the spec. That is what their users
expect of a "baked" block-weighted file (SuperMerger and the LoRA Block Weight extension's own save write one
plain file that needs no block-weight node), and it needs no SVD: every kind's ΔW is linear in one of its
tensors, which is multiplied by the module's weight wᵢ·fᵢ(block):
- a LoRA: `up` (down and alpha kept, so the rank and the scale rule are unchanged);
- a LoKr: W1, or its factor w1_a where W1 = w1_a·w1_b (ΔW = W1 ⊗ W2, bilinear);
- a LoHa: w1_a (ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b), and a Tucker core's contraction, are linear in it);
- a full module: diff and diff_b.
A module weighted 0 is left out. A DoRA module is refused: its update re-normalises W0 + ΔW, which a scale of
one tensor does not scale.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from difflora.adapter.lycoris import FullWeights, LohaWeights, LokrWeights
from difflora.adapter.types import Adapter, ModuleWeights
from difflora.composition.blocks import key_blocks
from difflora.config.export import ExportConfig
from difflora.config.spec import AdapterWeight, parse_adapter_weights
from difflora.errors import AdapterSpecError, ConfigError
from difflora.formats.export import export_adapter
from difflora.formats.read import load_adapter


def export_spec(config: ExportConfig) -> Path:
    """`export_adapter(config)`, where `config.adapter` may be a spec FILE[:WEIGHT[:TE_WEIGHT]][@BLOCKS]
    whose weights are baked into the written file (`weighted_adapter`)."""
    if Path(config.adapter).expanduser().is_file():
        return export_adapter(config)
    specs = parse_adapter_weights(config.adapter)
    if len(specs) != 1:
        raise AdapterSpecError(
            f"export takes one adapter, got {len(specs)} in {config.adapter!r}; merge several into one file "
            "first (difflora merge SPEC -o merged.safetensors), then export that."
        )
    (spec,) = specs
    source = Path(spec.name).expanduser()
    return export_adapter(config, source=(source, weighted_adapter(spec, load_adapter(source))))


def weighted_adapter(spec: AdapterWeight, adapter: Adapter) -> Adapter:
    """`adapter` with `spec`'s weight, text-encoder weight and block factors baked into its modules."""
    if spec.weight == 1 and spec.te_weight is None and spec.blocks is None:
        return adapter
    if any(weights.is_dora for weights in adapter.modules.values()):
        raise ConfigError(
            f"Adapter {spec.name!r} is a DoRA adapter: a weight cannot be baked into it (its update "
            "re-normalises the weights); export it without weights and set them in the loader."
        )
    blocks = key_blocks(spec, adapter) if spec.blocks is not None else None
    modules = {}
    for key, weights in adapter.modules.items():
        weight = spec.weight_for(key.partition(".")[0]) * (spec.block_factor(blocks(key)) if blocks else 1.0)
        if weight != 0:
            modules[key] = scaled(weights, weight)
    if not modules:
        raise AdapterSpecError(
            f"Every module of {spec} is weighted 0: the exported file would change nothing."
        )
    baked = {"weight": spec.weight, "te_weight": spec.text_encoder_weight}
    baked |= {"blocks": spec.blocks.text} if spec.blocks is not None else {}
    extra = adapter.meta.extra | {"difflora.baked_weights": json.dumps(baked)}
    return Adapter(modules=modules, meta=replace(adapter.meta, extra=extra))


def scaled(weights: ModuleWeights, factor: float) -> ModuleWeights:
    """The module whose ΔW is `factor` times `weights`' (see the module docstring for which tensor)."""
    if isinstance(weights, LokrWeights):
        field = "lokr_w1" if weights.lokr_w1 is not None else "lokr_w1_a"
        return replace(weights, **{field: getattr(weights, field) * factor})
    if isinstance(weights, LohaWeights):
        return replace(weights, hada_w1_a=weights.hada_w1_a * factor)
    if isinstance(weights, FullWeights):
        bias = weights.diff_b * factor if weights.diff_b is not None else None
        return replace(weights, diff=weights.diff * factor, diff_b=bias)
    return replace(weights, up=weights.up * factor)
