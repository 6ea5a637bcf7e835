"""LyCORIS modules made in the test from the published key grammar (LyCORIS `lycoris/modules/{lokr,loha,full}.py`:
the tensor names and shapes each layout writes), with random tensors, and their ΔW computed independently of
difflora: the Kronecker product written out index by index (einsum and reshape, not torch.kron), the Tucker
contraction as an explicit sum over the core's entries, and the scale rule restated from ComfyUI's
`calculate_weight` (alpha / dim where a factor is factorised, dim = w2_b's rows, else w1_b's; else 1).
"""

from __future__ import annotations

import math

import torch

LOKR_LAYOUTS = ("full-full", "full-lowrank", "lowrank-full", "lowrank-lowrank", "tucker")


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.3


def lokr_tensors(
    name: str, shape: tuple[int, ...], *, layout: str, rank: int = 2, alpha: float | None = 3.0, factor: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A LoKr module on a weight of `shape` ([out, in] or [out, in, k, k]): W1 [factor, factor] ⊗ W2 [out/f, in/f
    (, k, k)]. "tucker" needs a convolution; a convolution's non-Tucker W2 is 2-D [out/f, in/f·k·k], as LyCORIS
    writes it."""
    g = torch.Generator().manual_seed(seed)
    out2, in2, kernel = shape[0] // factor, shape[1] // factor, tuple(shape[2:])
    cols2 = in2 * math.prod(kernel)
    first, second = layout.split("-") if layout != "tucker" else ("lowrank", "tucker")
    t: dict[str, torch.Tensor] = {}
    if first == "full":
        t[f"{name}.lokr_w1"] = _randn(g, factor, factor)
    else:
        t[f"{name}.lokr_w1_a"], t[f"{name}.lokr_w1_b"] = _randn(g, factor, rank), _randn(g, rank, factor)
    if second == "full":
        t[f"{name}.lokr_w2"] = _randn(g, out2, in2, *kernel) if kernel else _randn(g, out2, in2)
    elif second == "lowrank":
        t[f"{name}.lokr_w2_a"], t[f"{name}.lokr_w2_b"] = _randn(g, out2, rank), _randn(g, rank, cols2)
    else:
        t[f"{name}.lokr_t2"] = _randn(g, rank, rank, *kernel)
        t[f"{name}.lokr_w2_a"], t[f"{name}.lokr_w2_b"] = _randn(g, rank, out2), _randn(g, rank, in2)
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(alpha)
    return t


def loha_tensors(
    name: str,
    shape: tuple[int, ...],
    *,
    tucker: bool = False,
    rank: int = 3,
    alpha: float | None = 2.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, cols, kernel = shape[0], math.prod(shape[1:]), tuple(shape[2:])
    t: dict[str, torch.Tensor] = {}
    for k in ("1", "2"):
        if tucker:
            t[f"{name}.hada_t{k}"] = _randn(g, rank, rank, *kernel)
            t[f"{name}.hada_w{k}_a"], t[f"{name}.hada_w{k}_b"] = (
                _randn(g, rank, out),
                _randn(g, rank, shape[1]),
            )
        else:
            t[f"{name}.hada_w{k}_a"], t[f"{name}.hada_w{k}_b"] = _randn(g, out, rank), _randn(g, rank, cols)
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(alpha)
    return t


def full_tensors(
    name: str, shape: tuple[int, ...], *, bias: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {f"{name}.diff": _randn(g, *shape)}
    if bias:
        t[f"{name}.diff_b"] = _randn(g, shape[0])
    return t


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, ...] = Σᵢⱼ core[i, j, ...] · wa[i, p] · wb[j, q], as an explicit sum over the core's entries."""
    total = torch.zeros(wa.shape[1], wb.shape[1], *core.shape[2:], dtype=torch.float64)
    for i in range(core.shape[0]):
        for j in range(core.shape[1]):
            outer = torch.outer(wa[i].double(), wb[j].double())
            total += outer.reshape(*outer.shape, *([1] * (core.ndim - 2))) * core[i, j].double()
    return total


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(W1 ⊗ W2)[a·c₂ + c, b·d₂ + d, ...] = W1[a, b] · W2[c, d, ...]."""
    (a, b), (c, d), rest = w1.shape, w2.shape[:2], tuple(w2.shape[2:])
    letters = "klmn"[: len(rest)]
    product = torch.einsum(f"ab,cd{letters}->acbd{letters}", w1.double(), w2.double())
    return product.reshape(a * c, b * d, *rest)


def expected_delta(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW (float64, shaped like the weight) of module `name` from its tensors, by the published formulas."""
    t = {key.removeprefix(name + "."): value for key, value in tensors.items() if key.startswith(name + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "diff" in t:
        return t["diff"].double().reshape(shape)
    if "hada_w1_a" in t:
        factors = [
            _tucker(t[f"hada_t{k}"], t[f"hada_w{k}_a"], t[f"hada_w{k}_b"])
            if f"hada_t{k}" in t
            else t[f"hada_w{k}_a"].double() @ t[f"hada_w{k}_b"].double()
            for k in ("1", "2")
        ]
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (factors[0] * factors[1] * scale).reshape(shape)
    w1 = t["lokr_w1"].double() if "lokr_w1" in t else t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].double()
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
    dim = (
        t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    )
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (_kron(w1, w2) * scale).reshape(shape)
