"""Training LoKr and LoHa through peft's `LoKrConfig` / `LoHaConfig`, and reading the trained layers out as
difflora's LyCORIS modules (`adapter.lycoris`), whose ΔW is the one peft trained.

peft's layers use LyCORIS's tensor names and layouts (`lokr_w1`, `lokr_w1_a/b`, `lokr_w2`, `lokr_w2_a/b`,
`lokr_t2`; `hada_w1_a/b`, `hada_w2_a/b`, `hada_t1/t2`), but always scale by alpha/r, where ComfyUI and
A1111 apply alpha/r only when a factor is factorised (`adapter.lycoris`). So the reading keeps peft's update:
a factorised module is written with alpha = scaling · r (consumers then apply exactly peft's scaling); a
LoKr with two full factors has the scale folded into `lokr_w1` (consumers apply 1).
"""

from __future__ import annotations

from typing import Any

from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from torch import nn

from difflora.adapter.inject import DEFAULT_ADAPTER, resolve_targets
from difflora.adapter.lycoris import LOHA_NAMES, LOKR_NAMES, LohaWeights, LokrWeights
from difflora.adapter.names import classic_name
from difflora.adapter.spec import LoraSpec
from difflora.errors import TargetNotFoundError

ALGOS: tuple[str, ...] = ("lora", "lokr", "loha")


def add_lycoris(
    model: nn.Module, component: str, spec: LoraSpec, *, adapter_name: str = DEFAULT_ADAPTER
) -> list[str]:
    """Inject trainable LoKr or LoHa layers (`spec.algo`; peft's initialisation, ΔW = 0 at the start) into
    `model` in place on the modules `spec` targets, and freeze the rest. Returns the adapted live names."""
    matched = [
        name
        for name in resolve_targets(model, spec.targets(component), component=component)
        if spec.keeps(component, name)
    ]
    if not matched:
        raise TargetNotFoundError(
            f"--blocks leaves no {spec.algo} target in the {component}: widen the block ranges."
        )
    common: dict[str, Any] = {
        "r": spec.rank,
        "alpha": spec.alpha,
        "target_modules": matched,
        "init_weights": True,
    }
    config = (
        LoKrConfig(**common, decompose_factor=spec.factor, use_effective_conv2d=True)
        if spec.algo == "lokr"
        else LoHaConfig(**common, use_effective_conv2d=True)
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    prefixes = tuple(f".{name}.{adapter_name}" for name in (*LOKR_NAMES, *LOHA_NAMES))
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(prefixes))
    return matched


def extract_lycoris(
    model: nn.Module, *, component: str, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, LokrWeights | LohaWeights]:
    """The trained LoKr/LoHa layers by classic module name, each with peft's ΔW under the consumers' scale
    rule (see the module docstring)."""
    result: dict[str, LokrWeights | LohaWeights] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoKrLayer | LoHaLayer) and adapter_name in module.scaling:
            result[classic_name(component, name, model)] = _weights(module, adapter_name)
    return result


def _weights(layer: LoKrLayer | LoHaLayer, adapter_name: str) -> LokrWeights | LohaWeights:
    names = LOKR_NAMES if isinstance(layer, LoKrLayer) else LOHA_NAMES
    tensors = {
        name: getattr(layer, name)[adapter_name].detach().float().clone()
        for name in names
        if adapter_name in getattr(layer, name)
    }
    scaling = float(layer.scaling[adapter_name])
    shape = tuple(layer.get_base_layer().weight.shape)
    if isinstance(layer, LoHaLayer):
        return LohaWeights(
            **tensors, stored_alpha=scaling * tensors["hada_w1_b"].shape[0], module_shape=shape
        )
    weights = LokrWeights(**tensors, module_shape=shape)
    if weights.factorised:
        return LokrWeights(**tensors, stored_alpha=scaling * weights.rank, module_shape=shape)
    tensors["lokr_w1"] = tensors["lokr_w1"] * scaling  # consumers scale two full factors by 1
    return LokrWeights(**tensors, module_shape=shape)


def lycoris_parameter(name: str) -> bool:
    """Whether a model parameter name is a LoKr/LoHa weight (for reports that count adapter parameters)."""
    return any(f".{tensor}." in name for tensor in (*LOKR_NAMES, *LOHA_NAMES))
