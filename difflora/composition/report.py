"""Composition report: how adapters interact, layer by layer, before you look at a single image.

For each module adapted by the composed set, with ΔWᵢ = (αᵢ/rᵢ)·Bᵢ·Aᵢ and weights wᵢ (text-encoder weight for
text-encoder modules), everything follows from the Gram matrix G[i, j] = ⟨ΔWᵢ, ΔWⱼ⟩ (Frobenius inner product):

* cosine(i, j) = G[i, j] / sqrt(G[i, i]·G[j, j]): 0 for adapters that change the layer in unrelated
  directions, ±1 when they push the same (or opposite) direction — the layers where styles bleed.
* ‖Σ wᵢ ΔWᵢ‖ / ‖ΔWᵢ‖ = sqrt(wᵀGw) / sqrt(G[i, i]): the composed update's size relative to what adapter i
  was trained to do on its own.
* drive along i = (Gw)[i] / G[i, i]: how strongly the composed update pushes along adapter i's own
  direction, in units of adapter i at weight 1. Two orthogonal adapters at weight 1 each drive 1.0 (each
  gets what it was trained for); two aligned ones drive ~2.0 (the layer is pushed twice as far as either
  adapter ever pushed it). A drive above OVERDRIVE (1.5) is flagged as over-driving that layer.

G is computed from the low-rank factors (⟨BᵢAᵢ, BⱼAⱼ⟩ = Σ (BᵢᵀBⱼ) ∘ (AᵢAⱼᵀ)), never from full ΔW matrices,
so the report costs little even on SDXL. A DoRA module's update m·V/‖V‖ − W0 (`difflora.adapter.dora`) is
full-rank and depends on the base weight W0: its layers are measured from full matrices against the base the
composer holds, and left unmeasured (listed) where no base is at hand (`difflora inspect`). DoRA is not
additive, so the report also says so, with the order in which the updates are applied (`dora_note`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from difflora.adapter.lycoris import is_lycoris
from difflora.adapter.types import Adapter, LoraWeights
from difflora.config.spec import AdapterWeight
from difflora.errors import first_n

OVERDRIVE = 1.5


@dataclass(frozen=True)
class LayerReport:
    module: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    norms: tuple[float, ...]  # ‖ΔWᵢ‖ of each adapter at weight 1
    cosines: dict[tuple[str, str], float]
    composed_norm: float  # ‖Σ wᵢ ΔWᵢ‖
    drives: tuple[float, ...]

    def relative_norm(self, index: int) -> float:
        return self.composed_norm / self.norms[index] if self.norms[index] else float("inf")

    @property
    def overdriven(self) -> list[str]:
        return [
            name for name, drive in zip(self.adapters, self.drives, strict=True) if abs(drive) > OVERDRIVE
        ]


@dataclass
class CompositionReport:
    adapters: list[AdapterWeight]
    layers: list[LayerReport] = field(default_factory=list)
    dora: list[str] = field(default_factory=list)  # the DoRA adapters among them
    unmeasured: list[str] = field(default_factory=list)  # DoRA layers with no base weight to measure against
    blocks: dict[str, str] = field(default_factory=dict)  # module -> block, where block weights are given

    def block_shares(self) -> dict[str, float]:
        """Each block's share of the composed update, Σ‖Σ wᵢΔWᵢ‖² over its layers / the total (block weights
        applied; "" holds the layers outside every block)."""
        energy: dict[str, float] = {}
        for layer in self.layers:
            block = self.blocks.get(layer.module, "")
            energy[block] = energy.get(block, 0.0) + layer.composed_norm**2
        total = sum(energy.values())
        return {block: value / total for block, value in sorted(energy.items())} if total else {}

    @property
    def warnings(self) -> list[str]:
        result = [dora_note(self.adapters, self.dora)] if self.dora and len(self.adapters) > 1 else []
        for layer in self.layers:
            for name in layer.overdriven:
                drive = layer.drives[layer.adapters.index(name)]
                result.append(
                    f"{layer.module}: drives {name!r} at {drive:.2f}x its trained strength "
                    f"(weights {_weights(layer)}); lower the weights of adapters that overlap here."
                )
        return result

    def text(self, *, max_layers: int | None = 40) -> str:
        """The report as a table, one line per layer (shared layers first, by decreasing overlap)."""
        names = [spec.name for spec in self.adapters]
        lines = [
            f"Composition of {', '.join(str(s) for s in self.adapters)} over {len(self.layers)} adapted layers"
        ]
        shared = [layer for layer in self.layers if len(layer.adapters) > 1]
        lines.append(_summary(shared, names))
        if self.blocks:
            shares = ", ".join(
                f"{block or 'other'} {share:.0%}" for block, share in self.block_shares().items()
            )
            lines.append(f"Share of the composed update per block: {shares}")
        if self.dora:
            lines.append(dora_note(self.adapters, self.dora))
        if self.unmeasured:
            lines.append(
                f"{len(self.unmeasured)} DoRA layers not measured (their update depends on the base weights, "
                f"which only composing on a model provides): {first_n(self.unmeasured, 3)}"
            )
        ordered = sorted(
            self.layers, key=lambda la: (-len(la.adapters), -max(map(abs, la.cosines.values()), default=0))
        )
        lines.append(f"{'layer':<58} {'cosine':>14}  {'|composed|/|own|':>22}  {'drive':>16}")
        rows = [_row(layer) for layer in ordered]
        if rows:
            lines.append(first_n(rows, len(rows) if max_layers is None else max_layers, separator="\n"))
        warnings = [w for w in self.warnings if not w.startswith(DORA_NOTE_START)]
        lines.append(f"{len(warnings)} over-driven layer warnings" + (":" if warnings else "."))
        if warnings:
            lines.append("  " + first_n([f"warning: {w}" for w in warnings], 20, separator="\n  "))
        return "\n".join(lines)


DORA_NOTE_START = "DoRA is not additive"


def dora_note(adapters: Sequence[AdapterWeight], dora: Sequence[str]) -> str:
    """What composing DoRA adapters means here, and how it differs from ComfyUI's and A1111's chains."""
    order = " + ".join(f"{spec.name}×{spec.weight:g}" for spec in adapters)
    verb = (
        "re-normalises the weights of its layers" if len(dora) == 1 else "re-normalise their layers' weights"
    )
    text = (
        f"{DORA_NOTE_START}: {', '.join(repr(n) for n in dora)} {verb}. "
        "difflora applies every adapter as its own update against the base weights W0 (a DoRA adapter's is "
        "m·V/‖V‖ − W0, V = W0 + (alpha/rank)·B·A, scaled by its weight) and adds the updates in the order "
        f"given: W = W0 + {order}; the order does not change the sum."
    )
    if len(adapters) > 1:
        text += (
            " ComfyUI and A1111 apply chained LoRAs one after another, and each DoRA patch re-normalises what "
            "the patches before it left: there the same adapters give other weights, which depend on their order."
        )
    return text


def _row(layer: LayerReport) -> str:
    cos = ", ".join(f"{v:+.2f}" for v in layer.cosines.values()) or "-"
    rel = ", ".join(f"{layer.relative_norm(i):.2f}" for i in range(len(layer.adapters)))
    drive = ", ".join(f"{d:.2f}" for d in layer.drives)
    flag = "  OVER-DRIVEN" if layer.overdriven else ""
    return f"{_short(layer.module, 58):<58} {cos:>14}  {rel:>22}  {drive:>16}{flag}"


def _weights(layer: LayerReport) -> str:
    return ", ".join(f"{n}={w:g}" for n, w in zip(layer.adapters, layer.weights, strict=True))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _summary(shared: list[LayerReport], names: list[str]) -> str:
    if len(names) < 2:
        return "One adapter: no overlap to measure; drive shows how far its weight pushes each layer."
    parts = []
    for a, b in itertools.combinations(names, 2):
        values = [abs(la.cosines[(a, b)]) for la in shared if (a, b) in la.cosines]
        if values:
            parts.append(
                f"{a}/{b}: {len(values)} shared layers, mean |cosine| {sum(values) / len(values):.3f}"
            )
        else:
            parts.append(f"{a}/{b}: no shared layers")
    return "; ".join(parts)


def inner(a: LoraWeights, b: LoraWeights) -> float:
    """⟨ΔWa, ΔWb⟩ from the factors: trace((Ba Aa)ᵀ (Bb Ab)) = Σ (BaᵀBb) ∘ (Aa Abᵀ), in float64."""
    up_a, down_a = a.up.double().flatten(1), a.down.double().flatten(1)
    up_b, down_b = b.up.double().flatten(1), b.down.double().flatten(1)
    return float(((up_a.T @ up_b) * (down_a @ down_b.T)).sum()) * a.scale * b.scale


def _gram(here: Sequence[LoraWeights], base: torch.Tensor | None) -> torch.Tensor:
    """G[i, j] = ⟨ΔWᵢ, ΔWⱼ⟩: from the factors, or from full updates where a DoRA or LyCORIS module is among them."""
    if base is None and not any(map(is_lycoris, here)):
        return torch.tensor([[inner(a, b) for b in here] for a in here], dtype=torch.float64)
    updates = torch.stack([w.delta(base).double().reshape(-1) for w in here])
    return updates @ updates.T


BaseWeights = Callable[[str], torch.Tensor]  # module key -> the base weight W0 of that layer


def composition_report(
    pairs: Sequence[tuple[AdapterWeight, Adapter]],
    *,
    base: BaseWeights | None = None,
    block: Callable[[str], str] | None = None,
) -> CompositionReport:
    """Per adapted module: cosines between the adapters' updates, the composed update's norm relative to
    each adapter's own, and the drive along each adapter (see the module docstring). `base` gives a layer's
    base weight, which DoRA layers are measured against (without it they are listed as unmeasured); `block`
    a module's block, whose factor multiplies the weights of adapters given block weights."""
    report = CompositionReport(adapters=[spec for spec, _ in pairs])
    report.dora = [spec.name for spec, adapter in pairs if adapter.dora_axes]
    modules = sorted({key for _, adapter in pairs for key in adapter.modules})
    for module in modules:
        here = [(spec, adapter.modules[module]) for spec, adapter in pairs if module in adapter.modules]
        component = module.partition(".")[0]
        names = tuple(spec.name for spec, _ in here)
        where = block(module) if block and any(spec.blocks for spec, _ in pairs) else None
        if where is not None:
            report.blocks[module] = where
        factors = [spec.block_factor(where) if where is not None else 1.0 for spec, _ in here]
        weights = torch.tensor(factors, dtype=torch.float64) * torch.tensor(
            [spec.weight_for(component) for spec, _ in here], dtype=torch.float64
        )
        dense = any(w.is_dora for _, w in here)
        if dense and base is None:
            report.unmeasured.append(module)
            continue
        gram = _gram([w for _, w in here], base(module) if dense and base is not None else None)
        diag = gram.diagonal()
        norms = tuple(float(v) for v in diag.clamp_min(0).sqrt())
        cosines = {
            (names[i], names[j]): float(gram[i, j] / (norms[i] * norms[j])) if norms[i] * norms[j] else 0.0
            for i, j in itertools.combinations(range(len(here)), 2)
        }
        composed = float((weights @ gram @ weights).clamp_min(0).sqrt())
        drives = tuple(
            float(v) for v in torch.where(diag > 0, (gram @ weights) / diag, torch.zeros_like(diag))
        )
        report.layers.append(
            LayerReport(module, names, tuple(float(w) for w in weights), norms, cosines, composed, drives)
        )
    return report
