"""`difflora inspect --spectrum`: how many of a LoRA's trained ranks carry its update.

For each module, the singular values of ΔW = (alpha/r)·B·A come from the factors, never from a dense ΔW:
B = Q_B R_B and Aᵀ = Q_A R_A (QR), so ΔW = Q_B (scale·R_B R_Aᵀ) Q_Aᵀ and, Q_B and Q_A having orthonormal
columns, the singular values of ΔW are those of the r×r core. Exact, and cheap even for a 3072×12288 layer.

A layer's energy is Σ sᵢ² (= ‖ΔW‖²_F); the rank it needs for a fraction f is the smallest k whose first k
components carry f of it. The summary proposes the rank most layers need and *measures* what
`difflora merge NAME:1 --rank K` keeps, by running that truncation (difflora.composition.merge.truncate).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from difflora.adapter.types import Adapter, LoraWeights
from difflora.composition.merge import truncate

FRACTIONS: tuple[float, ...] = (0.90, 0.99)
# The share of layers the proposed rank must cover at 99% energy: most, not all, since one outlier layer
# should not set the rank of the whole file (the measured figure then says what the outliers cost).
LAYER_SHARE = 0.95


@dataclass(frozen=True)
class LayerSpectrum:
    module: str
    rank: int
    singular_values: tuple[float, ...]  # descending, `rank` of them (float64 precision)

    @property
    def energy(self) -> float:
        return sum(s * s for s in self.singular_values)

    def rank_for(self, fraction: float) -> int:
        """The smallest k whose first k components carry `fraction` of the energy (0 for a zero update)."""
        total = self.energy
        if total <= 0:
            return 0
        running = 0.0
        for k, value in enumerate(self.singular_values, start=1):
            running += value * value
            # relative slack: float sums of the same values may land a hair below fraction·total
            if running >= fraction * total * (1 - 1e-12):
                return k
        return self.rank


def singular_values(weights: LoraWeights) -> torch.Tensor:
    """The singular values of (alpha/r)·B·A in float64, descending, from a QR of each factor and the SVD of
    the r×r core (the low-rank part of a DoRA module: its magnitude re-normalises against the base)."""
    up = weights.up.double().flatten(1)
    down = weights.down.double().flatten(1)
    _, r_up = torch.linalg.qr(up)
    _, r_down = torch.linalg.qr(down.T)
    return torch.linalg.svdvals(r_up @ r_down.T) * abs(weights.scale)


def adapter_spectrum(adapter: Adapter) -> list[LayerSpectrum]:
    """One LayerSpectrum per module, sorted by module key."""
    return [
        LayerSpectrum(module, w.rank, tuple(float(s) for s in singular_values(w)))
        for module, w in sorted(adapter.modules.items())
    ]


@dataclass(frozen=True)
class SpectrumSummary:
    trained_rank: int
    proposed_rank: int
    layer_share: float  # the share of layers that need <= proposed_rank for 99%
    kept: float | None  # the energy `merge --rank proposed_rank` keeps, measured; None where it cannot merge


def proposed_rank(layers: Sequence[LayerSpectrum], share: float = LAYER_SHARE) -> int:
    """The smallest rank that covers `share` of the layers at 99% energy."""
    needs = sorted(max(layer.rank_for(0.99), 1) for layer in layers)
    index = min(len(needs) - 1, max(0, math.ceil(share * len(needs)) - 1))
    return needs[index]


def kept_energy(adapter: Adapter, rank: int) -> float:
    """The fraction of the adapter's total update energy (Σ over layers of ‖ΔW‖²) that truncating every
    layer to `rank`, as `merge --rank` does, keeps: measured from the truncation's own error."""
    total = lost = 0.0
    for weights in adapter.modules.values():
        energy = float(singular_values(weights).pow(2).sum())
        total += energy
        if weights.rank > rank:
            _, error = truncate(weights, rank)
            lost += error * error * energy
    return 1.0 - lost / total if total > 0 else 1.0


def summarise(adapter: Adapter, layers: Sequence[LayerSpectrum]) -> SpectrumSummary:
    trained = max(layer.rank for layer in layers)
    rank = proposed_rank(layers)
    share = sum(max(layer.rank_for(0.99), 1) <= rank for layer in layers) / len(layers)
    kept = None if adapter.dora_axes else kept_energy(adapter, rank)
    return SpectrumSummary(trained, rank, share, kept)


def spectrum_text(adapter: Adapter, name: str, stem: str, *, verbose: bool = True) -> str:
    """The per-layer table (rank, energy, rank for 90%/99%, leading singular values) and the summary, whose
    merge command names the adapter `name` (as `difflora merge` finds it) and writes `<stem>-r<K>`."""
    layers = adapter_spectrum(adapter)
    if not layers:
        return "Spectrum: the adapter has no modules."
    lines = []
    if verbose:
        width = max(len(layer.module) for layer in layers)
        lines.append(f"{'module':<{width}}  rank  r90  r99  ‖ΔW‖_F     leading singular values")
        for layer in layers:
            leading = " ".join(f"{s:.3g}" for s in layer.singular_values[:4])
            lines.append(
                f"{layer.module:<{width}}  {layer.rank:>4}  {layer.rank_for(0.90):>3}  "
                f"{layer.rank_for(0.99):>3}  {layer.energy**0.5:<9.4g}  {leading}"
            )
    lines.append(summary_line(summarise(adapter, layers), name, stem))
    return "\n".join(lines)


def summary_line(summary: SpectrumSummary, name: str, stem: str) -> str:
    head = (
        f"rank {summary.trained_rank} trained; {summary.layer_share:.0%} of layers need "
        f"<= {summary.proposed_rank} for 99%"
    )
    if summary.kept is None:
        return head + " (DoRA: merge --rank does not apply; spectrum of the low-rank direction update)"
    if summary.proposed_rank >= summary.trained_rank:
        return head + ": the trained rank is used; keep it."
    rank = summary.proposed_rank
    output = shlex.quote(f"{stem}-r{rank}.safetensors")
    command = f"difflora merge {shlex.quote(name + ':1')} --rank {rank} -o {output}"
    return head + f": `{command}` keeps {summary.kept:.1%} (measured)"
