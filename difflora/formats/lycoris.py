"""LyCORIS tensors in kohya-named files: which tensor names make a LoKr, a LoHa or a full module, read and
written (the module names are kohya's, `difflora.formats.kohya`; the math is `difflora.adapter.lycoris`).

A module's tensors (after `<kohya module name>.`), as LyCORIS writes them and ComfyUI and A1111 read them:
- LoKr: `lokr_w1` or `lokr_w1_a` [a, r] + `lokr_w1_b` [r, b]; `lokr_w2` or `lokr_w2_a` + `lokr_w2_b`, or
  with `lokr_t2` [r, r, k, k] the Tucker layout `lokr_w2_a` [r, out2], `lokr_w2_b` [r, in2]; `alpha`.
- LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a`, `hada_w2_b` (with `hada_t1`/`hada_t2`
  [r, r, k, k]: `hada_wk_a` [r, out], `hada_wk_b` [r, in]); `alpha`.
- full: `diff` (the weight's shape), optional `diff_b` (the bias's).
A module missing a tensor its kind needs, or whose factors do not multiply, is refused naming its keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from difflora.adapter.lycoris import (
    FULL_NAMES,
    LOHA_NAMES,
    LOKR_NAMES,
    FullWeights,
    LohaWeights,
    LokrWeights,
    LycorisWeights,
    bias_delta,
    is_lycoris,
    product_shape,
)
from difflora.adapter.types import ModuleWeights
from difflora.errors import AdapterFormatError
from difflora.formats.fused import FusedLayer

LOKR_PARTS, LOHA_PARTS, FULL_PARTS = LOKR_NAMES, LOHA_NAMES, FULL_NAMES
LYCORIS_PARTS = (*LOKR_PARTS, *LOHA_PARTS, *FULL_PARTS)
_KINDS = {"LoKr": LOKR_PARTS, "LoHa": LOHA_PARTS, "full": FULL_PARTS}


def lycoris_kind(parts: Mapping[str, torch.Tensor]) -> str | None:
    """ "LoKr", "LoHa" or "full" for a module's tensors (by tensor name), None for a LoRA's."""
    return next((kind for kind, names in _KINDS.items() if any(n in parts for n in names)), None)


def read_module(name: str, parts: Mapping[str, torch.Tensor], source: str) -> LycorisWeights:
    """The LyCORIS module of kohya module `name` from its tensors (`alpha` included), checked: one kind,
    every tensor that kind needs, floats, finite, factors whose shapes multiply."""
    kind = lycoris_kind(parts)
    allowed = {*_KINDS[kind or "full"], *(("alpha",) if kind != "full" else ())}
    extra = sorted(set(parts) - allowed)
    if extra:
        raise AdapterFormatError(
            f"{source}: module {name} mixes {kind} tensors ({', '.join(sorted(set(parts) - set(extra)))}) with "
            f"{', '.join(extra)}; a module is one kind "
            "(LoRA, LoKr, LoHa or full). Nothing was loaded; re-export the file."
        )
    _check_values(name, parts, source)
    tensors = {key: value for key, value in parts.items() if key != "alpha"}
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    try:
        weights = _build(kind or "full", tensors, alpha)
        _check_products(weights)
    except (TypeError, ValueError, RuntimeError, IndexError) as error:
        listing = "\n  ".join(f"{name}.{part}: {kind}" for part in sorted(parts))
        raise AdapterFormatError(
            f"{source}: module {name} is an incomplete or inconsistent {kind} ({_first_line(error)}):\n  "
            f"{listing}\nNothing was loaded; the file is damaged, re-export it."
        ) from None
    return weights


def _build(kind: str, tensors: dict[str, torch.Tensor], alpha: float | None) -> LycorisWeights:
    if kind == "LoKr":
        for k in ("1", "2"):
            if f"lokr_w{k}" not in tensors and not {f"lokr_w{k}_a", f"lokr_w{k}_b"} <= set(tensors):
                raise ValueError(f"needs lokr_w{k}, or lokr_w{k}_a and lokr_w{k}_b")
        if "lokr_t2" in tensors and "lokr_w2" in tensors:
            raise ValueError("lokr_t2 comes with lokr_w2_a/lokr_w2_b, not lokr_w2")
        return LokrWeights(**tensors, stored_alpha=alpha)
    if kind == "LoHa":
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise ValueError("needs both Tucker cores hada_t1 and hada_t2, or neither")
        return LohaWeights(**tensors, stored_alpha=alpha)
    if "diff" not in tensors:
        raise ValueError("needs diff")
    return FullWeights(**tensors)


def _check_products(weights: LycorisWeights) -> None:
    """Factors whose shapes multiply (a rank that disagrees, a core of the wrong size) and an update of 2 or 4
    dimensions; a full module's `diff_b` one value per output row."""
    if isinstance(weights, LokrWeights):
        _check_pair(weights.lokr_w1_a, weights.lokr_w1_b, None, "lokr_w1")
        _check_pair(weights.lokr_w2_a, weights.lokr_w2_b, weights.lokr_t2, "lokr_w2")
        for full in (weights.lokr_w1, weights.lokr_w2):
            if full is not None and full.ndim not in (2, 4):
                raise ValueError(f"a full factor has shape {tuple(full.shape)}")
    if isinstance(weights, LohaWeights):
        _check_pair(weights.hada_w1_a, weights.hada_w1_b, weights.hada_t1, "hada_w1")
        _check_pair(weights.hada_w2_a, weights.hada_w2_b, weights.hada_t2, "hada_w2")
        w1, w2 = (product_shape(a, b, t) for a, b, t in _loha_factors(weights))
        if w1 != w2:
            raise ValueError(f"the Hadamard factors have shapes {w1} and {w2}")
    shape = weights.delta_shape()
    if len(shape) not in (2, 4):
        raise ValueError(f"the update would have shape {shape}")
    bias = weights.diff_b if isinstance(weights, FullWeights) else None
    if bias is not None and tuple(bias.shape) != (shape[0],):
        raise ValueError(f"diff_b has shape {tuple(bias.shape)}, not ({shape[0]},)")


def _check_pair(a: torch.Tensor | None, b: torch.Tensor | None, core: torch.Tensor | None, name: str) -> None:
    if a is None or b is None:
        return
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{name}_a and {name}_b must be matrices, not {tuple(a.shape)} and {tuple(b.shape)}")
    ranks = (a.shape[0], b.shape[0]) if core is not None else (a.shape[1], b.shape[0])
    wanted = tuple(core.shape[:2]) if core is not None else (ranks[1], ranks[1])
    if (core is not None and core.ndim not in (2, 4)) or ranks != wanted:
        raise ValueError(
            f"the shapes of {name}_a {tuple(a.shape)} and {name}_b {tuple(b.shape)} do not multiply"
        )


def _loha_factors(weights: LohaWeights) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    return [
        (weights.hada_w1_a, weights.hada_w1_b, weights.hada_t1),
        (weights.hada_w2_a, weights.hada_w2_b, weights.hada_t2),
    ]


def _check_values(name: str, parts: Mapping[str, torch.Tensor], source: str) -> None:
    for part, tensor in parts.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(
                f"{source}: tensor {name}.{part} is {tensor.dtype}; LyCORIS weights are floats."
            )
        if part == "alpha" and tensor.numel() != 1:
            raise AdapterFormatError(
                f"{source}: {name}.alpha holds {tensor.numel()} numbers; an alpha is one."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(
                f"{source}: tensor {name}.{part} holds NaN or infinite values; the file is damaged. Use an "
                "earlier checkpoint or re-export it."
            )


def _first_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


# ----------------------------------------------------------------------------------------------- writing


def module_tensors(name: str, weights: LycorisWeights) -> dict[str, torch.Tensor]:
    """The module's tensors under `<name>.<LyCORIS tensor>`, with `.alpha` (float32) where its kind has one.
    LoKr and LoHa always write alpha, the effective one, so every consumer applies the same scale."""
    tensors = {f"{name}.{part}": t.detach() for part, t in weights.tensors().items()}
    if not isinstance(weights, FullWeights):
        tensors[f"{name}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    return tensors


# ----------------------------------------------------------------------------------------------- fused layers


def split_rows(layer: FusedLayer, weights: LycorisWeights) -> dict[str, FullWeights]:
    """A LyCORIS module on a fused layer as one full module per part: each part's rows of ΔW (and of the
    bias change), exact. A Kronecker or Hadamard product has no factorised form per part."""
    delta = weights.delta()
    if delta.shape[0] != layer.out_features:
        raise ValueError(
            f"{layer.name} has {layer.out_features} output rows, the {weights.kind} update {delta.shape[0]}"
        )
    bias = weights.diff_b.float() if isinstance(weights, FullWeights) and weights.diff_b is not None else None
    if layer.swap_halves:
        delta = torch.cat(delta.chunk(2, dim=0)[::-1], dim=0)
        bias = torch.cat(bias.chunk(2, dim=0)[::-1], dim=0) if bias is not None else None
    return {
        part.key: FullWeights(
            diff=delta[start:stop].contiguous(),
            diff_b=bias[start:stop].contiguous() if bias is not None else None,
        )
        for part, (start, stop) in zip(layer.parts, layer.row_ranges(), strict=True)
    }


def fuse_rows(layer: FusedLayer, parts: Mapping[str, ModuleWeights]) -> FullWeights:
    """One full module on the fused layer whose update is, part by part, each part's update (zero for a part
    that has none): how a LyCORIS module split by `split_rows`, or any mix with LoRAs, goes back exactly."""
    rows, biases = [], []
    for part in layer.parts:
        weights = parts.get(part.key)
        rows.append(weights.delta() if weights is not None else torch.zeros(part.rows, layer.in_features))
        bias = bias_delta(weights) if weights is not None else None
        biases.append(bias if bias is not None else torch.zeros(part.rows))
    delta, bias = torch.cat([r.flatten(1) for r in rows]), torch.cat(biases)
    if layer.swap_halves:
        delta, bias = torch.cat(delta.chunk(2)[::-1]), torch.cat(bias.chunk(2)[::-1])
    return FullWeights(diff=delta, diff_b=bias if bool(bias.any()) else None)


__all__ = ["LYCORIS_PARTS", "is_lycoris", "lycoris_kind", "module_tensors", "read_module", "split_rows"]
