"""LyCORIS modules in memory: LoKr, LoHa and full weight differences, each with its exact ΔW.

The formulas (LyCORIS `lycoris/modules/{lokr,loha,full}.py`) and the scale as the consumers apply it
(ComfyUI `comfy/weight_adapter/{lokr,loha}.py` `calculate_weight`, A1111 `network_{lokr,hada,full}.py`):

* LoKr: ΔW = s · (W1 ⊗ W2), W1 = `lokr_w1` or `lokr_w1_a @ lokr_w1_b`; W2 = `lokr_w2`, `lokr_w2_a @ lokr_w2_b`,
  or with a Tucker core `lokr_t2` [r, r, k, k]: W2[p, q] = Σᵢⱼ t2[i, j] · w2_a[i, p] · w2_b[j, q].
  s = alpha / r only where a factor is factorised (r = `w2_b.shape[0]`, else `w1_b.shape[0]`); two full
  factors, or no alpha, mean s = 1. A 4-D W2 (convolution) takes W1 as [a, b, 1, 1].
* LoHa: ΔW = s · (W1 ∘ W2) with Wₖ = `hada_wk_a @ hada_wk_b`, or with Tucker cores `hada_tk` the same
  contraction as LoKr's; s = alpha / `hada_w1_b.shape[0]` (1 without alpha).
* full: ΔW = `diff` (no scale), and the bias changes by `diff_b`.

Every `delta()` is float32 with the module's output rows first and the module's own element count, so it
reshapes to the weight ([out, in] or [out, in, k, k]). The interface is LoraWeights' where the composer,
the report and the merge use it: `delta`, `rank`, `alpha`, `scale`, `parameter_count`, `is_dora`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

# The tensor names of each kind, as LyCORIS, peft, ComfyUI and A1111 spell them (alpha aside).
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
FULL_NAMES = ("diff", "diff_b")


def product_shape(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None) -> tuple[int, ...]:
    """The shape of a @ b, or of a Tucker product (wa [r, out], wb [r, in], core [r, r, k, k])."""
    if core is not None:
        return (int(a.shape[1]), int(b.shape[1]), *core.shape[2:])
    return (int(a.shape[0]), int(b.shape[1]))


def rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, ...] = Σᵢⱼ core[i, j, ...] · wa[i, p] · wb[j, q] (LyCORIS's Tucker layout: wa [r, out], wb [r, in])."""
    return torch.einsum("ij...,ip,jq->pq...", core.float(), wa.float(), wb.float())


@dataclass
class _Lycoris:
    """What every LyCORIS module shares: no DoRA magnitude, and ΔW as the only view of its update."""

    kind: ClassVar[str] = "LyCORIS"
    magnitude: ClassVar[None] = None
    magnitude_axis: ClassVar[str] = "out"
    # The adapted weight's shape where the reader knows it: a LoKr or LoHa on a kxk convolution may hold a
    # 2-D product [out, in·k·k], which `delta()` then gives as [out, in, k, k].
    module_shape: tuple[int, ...] | None = field(default=None, kw_only=True)

    @property
    def is_dora(self) -> bool:
        return False

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors under their LyCORIS names (without alpha), for writing."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in float32 (see the module docstring); `base` is accepted for LoraWeights' signature only."""
        update = self._update()
        return update.reshape(self.module_shape) if self.module_shape else update

    def delta_shape(self) -> tuple[int, ...]:
        """The shape `delta()` has, from the factors' shapes alone."""
        return self.module_shape or self._update_shape()

    def _update(self) -> torch.Tensor:
        raise NotImplementedError

    def _update_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        return self.delta_shape()[0]

    @property
    def in_numel(self) -> int:
        """Elements of one output row of the weight (in, or in·k·k for a convolution)."""
        return math.prod(self.delta_shape()[1:])

    @property
    def kernel(self) -> tuple[int, ...] | None:
        """The convolution kernel where the tensors tell it (a 4-D factor), else None."""
        return None


@dataclass
class LokrWeights(_Lycoris):
    kind: ClassVar[str] = "LoKr"
    lokr_w1: torch.Tensor | None = None
    lokr_w1_a: torch.Tensor | None = None
    lokr_w1_b: torch.Tensor | None = None
    lokr_w2: torch.Tensor | None = None
    lokr_w2_a: torch.Tensor | None = None
    lokr_w2_b: torch.Tensor | None = None
    lokr_t2: torch.Tensor | None = None
    stored_alpha: float | None = None

    @property
    def rank(self) -> int:
        """r of the factorised part (w2's where both are); the smaller side of W1 ⊗ W2 where neither is."""
        for b in (self.lokr_w2_b, self.lokr_w1_b):
            if b is not None:
                return int(b.shape[0])
        return min(self.out_features, self.in_numel)

    @property
    def factorised(self) -> bool:
        return self.lokr_w1_b is not None or self.lokr_w2_b is not None

    @property
    def alpha(self) -> float:
        return self.stored_alpha if self.stored_alpha is not None and self.factorised else float(self.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def w1(self) -> torch.Tensor:
        if self.lokr_w1 is not None:
            return self.lokr_w1.float()
        assert self.lokr_w1_a is not None and self.lokr_w1_b is not None
        return self.lokr_w1_a.float() @ self.lokr_w1_b.float()

    def w2(self) -> torch.Tensor:
        if self.lokr_w2 is not None:
            return self.lokr_w2.float()
        assert self.lokr_w2_a is not None and self.lokr_w2_b is not None
        if self.lokr_t2 is not None:
            return rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return self.lokr_w2_a.float() @ self.lokr_w2_b.float()

    def _update(self) -> torch.Tensor:
        w1, w2 = self.w1(), self.w2()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale  # kron views its inputs

    def _shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w1 = (
            tuple(self.lokr_w1.shape)
            if self.lokr_w1 is not None
            else product_shape(self.lokr_w1_a, self.lokr_w1_b, None)
        )  # type: ignore[arg-type]
        if self.lokr_w2 is not None:
            return w1, tuple(self.lokr_w2.shape)
        return w1, product_shape(self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2)  # type: ignore[arg-type]

    def _update_shape(self) -> tuple[int, ...]:
        (o1, i1), w2 = self._shapes()
        return (o1 * w2[0], i1 * w2[1], *w2[2:])

    @property
    def kernel(self) -> tuple[int, ...] | None:
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_t2
        return tuple(w2.shape[2:]) if w2 is not None and w2.ndim == 4 else None


@dataclass
class LohaWeights(_Lycoris):
    kind: ClassVar[str] = "LoHa"
    hada_w1_a: torch.Tensor
    hada_w1_b: torch.Tensor
    hada_w2_a: torch.Tensor
    hada_w2_b: torch.Tensor
    hada_t1: torch.Tensor | None = None
    hada_t2: torch.Tensor | None = None
    stored_alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.hada_w1_b.shape[0])

    @property
    def alpha(self) -> float:
        return self.stored_alpha if self.stored_alpha is not None else float(self.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _factor(self, a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
        return rebuild_tucker(core, a, b) if core is not None else a.float() @ b.float()

    def _update(self) -> torch.Tensor:
        m1 = self._factor(self.hada_w1_a, self.hada_w1_b, self.hada_t1)
        m2 = self._factor(self.hada_w2_a, self.hada_w2_b, self.hada_t2)
        return m1 * m2 * self.scale

    def _update_shape(self) -> tuple[int, ...]:
        return product_shape(self.hada_w1_a, self.hada_w1_b, self.hada_t1)

    @property
    def kernel(self) -> tuple[int, ...] | None:
        return tuple(self.hada_t1.shape[2:]) if self.hada_t1 is not None else None


@dataclass
class FullWeights(_Lycoris):
    kind: ClassVar[str] = "full"
    diff: torch.Tensor
    diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return min(self.out_features, self.in_numel)

    @property
    def alpha(self) -> float:
        return float(self.rank)

    @property
    def scale(self) -> float:
        return 1.0

    def _update(self) -> torch.Tensor:
        return self.diff.float()

    def _update_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    @property
    def kernel(self) -> tuple[int, ...] | None:
        return tuple(self.diff.shape[2:]) if self.diff.ndim == 4 else None


LycorisWeights = LokrWeights | LohaWeights | FullWeights
LYCORIS_TYPES: tuple[type, ...] = (LokrWeights, LohaWeights, FullWeights)


def is_lycoris(weights: object) -> bool:
    return isinstance(weights, LYCORIS_TYPES)


def bias_delta(weights: object) -> torch.Tensor | None:
    """The change to the module's bias (a full module's `diff_b`), float32; None where there is none."""
    if isinstance(weights, FullWeights) and weights.diff_b is not None:
        return weights.diff_b.float()
    return None
