"""`difflora merge a:0.7,b:0.3 -o out.safetensors`: several adapters as one ordinary adapter file.

Exact by default: for each module the ranks are concatenated,

    A = [A₁; A₂; ...]   B = [c₁B₁, c₂B₂, ...]   alpha = rank = Σ rᵢ   (scale 1),  cᵢ = wᵢ · αᵢ / rᵢ

so the file's update B·A equals Σ wᵢ·ΔWᵢ (per-block weights baked into wᵢ), the same W as composing the adapters at those weights
(text-encoder modules use the text-encoder weights). Kohya's default merge averages up and down matrices
and peft's "linear" combination mixes factors, neither of which equals Σ wᵢΔWᵢ.

A LyCORIS module (LoKr, LoHa, full) enters as the LoRA of its exact update (`adapter.lycoris_svd`: its full
SVD, rank = its update's numerical rank), so the merge of a LyCORIS file is an ordinary LoRA file.

With `rank=K`, each module whose concatenated rank exceeds K is truncated to its best rank-K approximation
(SVD, computed through QR of the factors so that no full ΔW is formed), and the relative Frobenius error
‖ΔW − ΔW_K‖ / ‖ΔW‖ of every layer is reported.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflora.adapter.lycoris import is_lycoris
from difflora.adapter.lycoris_svd import as_lora
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights, ModuleWeights
from difflora.composition.blocks import key_blocks
from difflora.composition.find import adapter_dirs as search_dirs
from difflora.composition.find import find_adapter
from difflora.config.spec import AdapterWeight, adapter_set
from difflora.errors import AdapterCompatibilityError, AdapterSpecError, ConfigError, Interrupted
from difflora.formats.native import save_adapter
from difflora.formats.read import load_adapter
from difflora.safe_io import interrupted_write_message

logger = logging.getLogger(__name__)


@dataclass
class MergeResult:
    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error (SVD only)
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (concatenated, kept)
    path: Path | None = None

    def text(self) -> str:
        lines = [f"Merged {len(self.adapter.modules)} modules."]
        if not self.errors:
            lines.append("Exact merge (ranks concatenated): the file's update equals Σ wᵢ·ΔWᵢ.")
            return "\n".join(lines)
        worst = max(self.errors.values(), default=0.0)
        mean = sum(self.errors.values()) / len(self.errors)
        lines.append(f"SVD truncation: relative Frobenius error mean {mean:.4f}, worst {worst:.4f}")
        for module, error in sorted(self.errors.items(), key=lambda item: -item[1]):
            before, after = self.ranks[module]
            lines.append(f"  {module:<72} rank {before:>3} -> {after:<3} error {error:.4f}")
        return "\n".join(lines)


def merge_adapters(
    pairs: Sequence[tuple[AdapterWeight, Adapter]], *, rank: int | None = None, name: str = "merged"
) -> MergeResult:
    """Merge in-memory adapters at their weights (exact, or truncated to `rank` with per-layer errors)."""
    if not pairs:
        raise AdapterSpecError("Nothing to merge: give at least one adapter.")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank: must be at least 1, got {rank}")
    _check_same_base(pairs)
    _check_no_dora(pairs)
    result = MergeResult(adapter=Adapter(modules={}, meta=_merged_meta(pairs, name)))
    tables = [
        key_blocks(spec, adapter) if spec.blocks else None for spec, adapter in pairs
    ]  # baked block weights
    for module in sorted({key for _, adapter in pairs for key in adapter.modules}):
        parts = [
            (weight, _as_lora(adapter.modules[module]))
            for (spec, adapter), blocks in zip(pairs, tables, strict=True)
            if module in adapter.modules and (weight := _weight(spec, blocks, module)) != 0
        ]
        if not parts:
            continue  # every adapter that touches this module has weight 0 there: no update
        _check_shapes(module, [w for _, w in parts])
        merged = _concatenate(parts)
        if rank is not None and merged.rank > rank:
            truncated, error = truncate(merged, rank)
            result.errors[module], result.ranks[module] = error, (merged.rank, rank)
            merged = truncated
        result.adapter.modules[module] = merged
    if not result.adapter.modules:
        raise AdapterSpecError("Every weight is 0: the merged adapter would change nothing.")
    return result


def _weight(spec: AdapterWeight, blocks: Callable[[str], str] | None, module: str) -> float:
    """wᵢ for `module`: the adapter's weight for its component times its block's factor (`composition.blocks`)."""
    return spec.weight_for(module.partition(".")[0]) * (spec.block_factor(blocks(module)) if blocks else 1.0)


def _as_lora(weights: ModuleWeights) -> LoraWeights:
    """A LyCORIS module as the LoRA of the same update (exact SVD, `adapter.lycoris_svd`); a LoRA as it is."""
    return as_lora(weights) if is_lycoris(weights) else weights  # type: ignore[arg-type,return-value]


def _concatenate(parts: Sequence[tuple[float, LoraWeights]]) -> LoraWeights:
    downs = [w.down.float() for _, w in parts]
    ups = [w.up.float() * (weight * w.scale) for weight, w in parts]
    down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
    return LoraWeights(down=down, up=up, alpha=float(down.shape[0]))


def truncate(weights: LoraWeights, rank: int) -> tuple[LoraWeights, float]:
    """Best rank-`rank` approximation of ΔW = scale·B·A and its relative Frobenius error. Uses QR of B and
    Aᵀ so the SVD is of an r×r core: ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ."""
    up = weights.up.double().flatten(1) * weights.scale
    down = weights.down.double().flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vt = torch.linalg.svd(r_up @ r_down.T)
    total = float((s**2).sum())
    error = float((s[rank:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    root = s[:rank].sqrt()
    new_up = (q_up @ u[:, :rank]) * root
    new_down = root[:, None] * (vt[:rank] @ q_down.T)
    if weights.down.ndim == 4:
        new_down = new_down.reshape(rank, *weights.down.shape[1:])
        new_up = new_up.reshape(*new_up.shape, 1, 1)
    return LoraWeights(down=new_down.float(), up=new_up.float(), alpha=float(rank)), error


def _check_shapes(module: str, parts: Sequence[LoraWeights]) -> None:
    shapes = {(tuple(w.down.shape[1:]), w.up.shape[0]) for w in parts}
    if len(shapes) > 1:
        raise AdapterCompatibilityError(
            f"Cannot merge: the adapters disagree on the shape of {module} ({sorted(shapes)}); they were "
            "made for different base models."
        )


def _check_no_dora(pairs: Sequence[tuple[AdapterWeight, Adapter]]) -> None:
    dora = [spec.name for spec, adapter in pairs if adapter.dora_axes]
    if dora:
        raise AdapterCompatibilityError(
            f"Cannot merge {', '.join(repr(n) for n in dora)}: DoRA adapters re-normalise the base weights, "
            "so their update is not a low-rank B·A that another adapter file could hold. Compose them at "
            "generation instead (difflora generate --adapters ...)."
        )


def _check_same_base(pairs: Sequence[tuple[AdapterWeight, Adapter]]) -> None:
    known = [(spec.name, a.meta) for spec, a in pairs if a.meta.base_architecture]
    for (name_a, meta_a), (name_b, meta_b) in itertools.pairwise(known):
        if meta_a.base_architecture != meta_b.base_architecture:
            raise AdapterCompatibilityError(
                f"Cannot merge {name_a!r} (made for {meta_a.base_model or '?'}, {meta_a.base_architecture}) "
                f"with {name_b!r} (made for {meta_b.base_model or '?'}, {meta_b.base_architecture}): "
                "different architectures."
            )
        if meta_a.base_hash and meta_b.base_hash and meta_a.base_hash != meta_b.base_hash:
            logger.warning(
                "%s and %s were trained on different weights of the same architecture (%s vs %s).",
                name_a,
                name_b,
                meta_a.base_hash,
                meta_b.base_hash,
            )


# What a merge inherits from its inputs: the base model's identity. Not dataclasses.replace(base, ...), which
# would also carry one input's provenance (its config, source format, date, extra keys) into the merge.
_BASE_IDENTITY = ("base_model", "base_family", "base_architecture", "base_hash", "prediction_type")


def _merged_meta(pairs: Sequence[tuple[AdapterWeight, Adapter]], name: str) -> AdapterMeta:
    base = next((a.meta for _, a in pairs if a.meta.base_architecture), pairs[0][1].meta)
    triggers = list(dict.fromkeys(word for _, a in pairs for word in a.meta.trigger_words))
    sources = [
        {"name": spec.name, "weight": spec.weight, "te_weight": spec.text_encoder_weight}
        | ({"blocks": spec.blocks.text} if spec.blocks else {})
        for spec, _ in pairs
    ]
    identity = {key: getattr(base, key) for key in _BASE_IDENTITY}
    return AdapterMeta(
        name=name, trigger_words=triggers, extra={"difflora.merged_from": json.dumps(sources)}, **identity
    )


def merge(
    adapters: Sequence[AdapterWeight],
    output: str | os.PathLike,
    *,
    rank: int | None = None,
    adapter_dirs: Sequence[str | os.PathLike] = (),
    config_toml: str = "",
) -> MergeResult:
    """Load the adapters named, merge them and write `output` atomically."""
    directories = search_dirs(adapter_dirs)
    pairs = [(spec, load_adapter(find_adapter(spec.name, directories))) for spec in adapter_set(adapters)]
    output = Path(output)
    result = merge_adapters(pairs, rank=rank, name=output.stem)
    result.adapter.meta.config_toml = config_toml
    existed = output.exists()
    try:
        result.path = save_adapter(result.adapter, output)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_write_message(output, existed=existed)) from None
    logger.info("Wrote %s (%d modules).", output, len(result.adapter.modules))
    return result
