"""LoRA layers on the UNet and text encoders, through peft.

peft owns the layer math: an adapted Linear computes W0·x + (alpha/rank)·B·A·dropout(x), with B zero-initialised
so a fresh adapter changes nothing. This module only decides *where* adapters go (the attention projections
by default, `spec.py`), validates the request against the live model with a helpful error, moves weights
between peft layers and `LoraWeights` (by classic names, `names.py`), fuses them into the base weights for
a while (`merged_lora`, for sample grids), and reports parameter counts.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from torch import nn

from difflora.adapter.names import adaptable_modules, classic_name, live_name
from difflora.adapter.spec import LoraSpec
from difflora.adapter.svd import svd_to_lora
from difflora.adapter.types import LoraWeights
from difflora.errors import TargetNotFoundError

DEFAULT_ADAPTER = "default"


def resolve_targets(model: nn.Module, targets: Sequence[str], *, component: str) -> list[str]:
    """Live names of the modules matching `targets` (suffix match on whole name segments, as peft does).
    Raises TargetNotFoundError for a target that matches nothing, listing valid names and close matches."""
    names = list(adaptable_modules(model))
    matched: list[str] = []
    if "*" in targets:  # --targets all-linear
        return [name for name, module in adaptable_modules(model).items() if _is_linear(module)]
    for target in targets:
        hits = [name for name in names if name == target or name.endswith("." + target)]
        if not hits:
            raise TargetNotFoundError(_missing_target_message(target, names, component))
        matched.extend(hit for hit in hits if hit not in matched)
    return matched


def _is_linear(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", module), nn.Linear)


def _missing_target_message(target: str, names: Iterable[str], component: str) -> str:
    suffixes = sorted(
        {
            ".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
            for name in names
        }
    )
    close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"LoRA target {target!r} matches no Linear/Conv2d module in the {component}.{hint}\n"
        f"Valid target names here: {', '.join(suffixes)}"
    )


def add_lora(
    model: nn.Module, component: str, spec: LoraSpec, *, adapter_name: str = DEFAULT_ADAPTER
) -> list[str]:
    """Inject trainable LoRA layers (A: kaiming-uniform, B: zeros) into `model` in place, as `spec` says,
    and freeze the rest. A DoRA layer's trainable `lora_magnitude_vector` (one value per output row) starts
    at the base weight's row norms. Returns the live names of the adapted modules."""
    targets = spec.targets(component)
    matched = [
        name for name in resolve_targets(model, targets, component=component) if spec.keeps(component, name)
    ]
    if not matched:
        raise TargetNotFoundError(
            f"--blocks leaves no LoRA target in the {component}: widen the block ranges."
        )
    # peft matches pattern keys as module-name suffixes: "conv1" is every ResNet's conv1.
    rank_pattern, alpha_pattern = spec.conv_patterns(component)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        # the live names where every module is not wanted (all-linear, --blocks), else peft's suffixes
        target_modules=matched if "*" in targets or spec.blocks else list(targets),
        init_lora_weights=True,
        use_rslora=spec.rslora,
        use_dora=spec.dora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name and f".{adapter_name}." in name + ".")
    return matched


def remove_adapter(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Delete peft adapter `adapter_name` from every layer; a layer left without adapters is replaced by its
    base layer, so a model whose adapters were all removed is the plain model again (peft's own
    `unload` belongs to PeftModel, which difflora's injected models are not)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns when the last adapter of a layer goes
            module.delete_adapter(adapter_name)
        if not module.lora_A:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter_name, None)
        if not config:
            del model.peft_config


def inject_weights(
    model: nn.Module,
    *,
    component: str,
    modules: Mapping[str, LoraWeights],
    adapter_name: str,
) -> None:
    """Add a peft adapter named `adapter_name` whose layers hold exactly `modules` (classic names relative to
    the component, e.g. "down_blocks.0...to_q"). Ranks and alphas may differ per module (merged or imported
    adapters): they become peft rank/alpha patterns. Used by dynamic composition."""
    live = {live_name(component, name, model): weights for name, weights in modules.items()}
    ranks = {name: weights.rank for name, weights in live.items()}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=1.0,
        target_modules=sorted(live),
        rank_pattern={f"^{_escape(name)}$": rank for name, rank in ranks.items()},
        alpha_pattern={f"^{_escape(name)}$": w.alpha for name, w in live.items()},
        init_lora_weights=False,
    )
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    set_weights(model, component=component, modules=modules, adapter_name=adapter_name)


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def set_weights(
    model: nn.Module, *, component: str, modules: Mapping[str, LoraWeights], adapter_name: str
) -> None:
    """Copy A, B and alpha into already-injected peft layers."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, weights in modules.items():
            layer = layers[live_name(component, name, model)]
            layer.lora_A[adapter_name].weight.copy_(weights.down)
            layer.lora_B[adapter_name].weight.copy_(weights.up)
            layer.lora_alpha[adapter_name] = weights.alpha
            layer.scaling[adapter_name] = weights.alpha / weights.rank


def extract_weights(
    model: nn.Module, *, component: str, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, LoraWeights]:
    """The adapter's tensors by classic module name. Alpha is stored so that alpha/rank is peft's scaling:
    an rsLoRA layer (scaling alpha/sqrt(rank)) is written with alpha·sqrt(rank), so files need no flag.
    A DoRA layer's magnitude comes as a 1-D vector, one value per output row (peft's axis). An AdaLoRA layer
    becomes a LoRA pair of its current rank (`svd.py`); one pruned to rank 0 is left out."""
    result: dict[str, LoraWeights] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if isinstance(module, AdaLoraLayer):
            weights = svd_to_lora(module, adapter_name)
            if weights is not None:
                result[classic_name(component, name, model)] = weights
            continue
        down = module.lora_A[adapter_name].weight.detach().clone()
        up = module.lora_B[adapter_name].weight.detach().clone()
        rank = down.shape[0]
        alpha = float(module.scaling[adapter_name]) * rank
        magnitudes = getattr(module, "lora_magnitude_vector", {})
        magnitude = (
            magnitudes[adapter_name].weight.detach().flatten().clone() if adapter_name in magnitudes else None
        )
        result[classic_name(component, name, model)] = LoraWeights(down, up, alpha, magnitude=magnitude)
    return result


@contextmanager
def merged_lora(models: Sequence[nn.Module], adapter_name: str = DEFAULT_ADAPTER) -> Iterator[None]:
    """Inside: every plain LoRA layer of `models` computes with W0 + ΔW and its LoRA branch off. After: the
    original weight tensors are back in place, untouched (put back, never un-merged by subtraction, which
    would round), and every LoRA parameter's requires_grad is as before, so training goes on bit for bit.
    Layers with other parametrisations (peft's DoRA: a normalised weight, not a sum; AdaLoRA's SVD form) or
    on a quantized base layer (integer weights) keep peft's path."""
    swapped: list[tuple[LoraLayer, nn.Module, torch.Tensor, dict[nn.Parameter, bool]]] = []
    try:
        for model in models:
            for layer in model.modules():
                if _mergeable(layer, adapter_name):
                    swapped.append(_merge(layer, adapter_name))
        yield
    finally:
        for layer, base, original, grads in reversed(swapped):
            base.weight.data = original
            layer.enable_adapters(True)
            for parameter, wanted in grads.items():
                parameter.requires_grad_(wanted)


def _mergeable(layer: nn.Module, adapter_name: str) -> bool:
    return (
        isinstance(layer, LoraLayer)
        and not isinstance(layer, AdaLoraLayer)  # its update is B·diag(E)·A / ranknum, not B·A
        and adapter_name in layer.lora_A
        and not layer.disable_adapters
        and not layer.use_dora.get(adapter_name, False)
        and type(layer.get_base_layer()) in (nn.Linear, nn.Conv2d)  # not a quantized base (--quantize-base)
    )


def _merge(layer: LoraLayer, adapter_name: str) -> tuple[LoraLayer, nn.Module, torch.Tensor, dict]:
    down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    weights = LoraWeights(
        down=down.detach(), up=up.detach(), alpha=float(layer.scaling[adapter_name]) * down.shape[0]
    )
    base = layer.get_base_layer()
    original = base.weight.data
    delta = weights.delta().to(original.device).reshape(original.shape)
    grads = {p: p.requires_grad for p in layer.parameters() if p is not base.weight}
    base.weight.data = (original.float() + delta).to(original.dtype)
    layer.enable_adapters(False)
    return layer, base, original, grads


@dataclass(frozen=True)
class ParameterCount:
    component: str
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def parameter_report(models: Mapping[str, nn.Module]) -> list[ParameterCount]:
    """Trainable and total parameters per component (and a 'total' row)."""
    rows = []
    for component, model in models.items():
        params = list(model.parameters())
        rows.append(
            ParameterCount(
                component,
                trainable=sum(p.numel() for p in params if p.requires_grad),
                total=sum(p.numel() for p in params),
            )
        )
    rows.append(ParameterCount("total", sum(r.trainable for r in rows), sum(r.total for r in rows)))
    return rows


def format_parameter_report(rows: Sequence[ParameterCount]) -> str:
    lines = [f"{'component':<16}{'trainable':>14}{'total':>16}{'%':>9}"]
    for row in rows:
        lines.append(f"{row.component:<16}{row.trainable:>14,}{row.total:>16,}{row.percent:>8.3f}%")
    return "\n".join(lines)
