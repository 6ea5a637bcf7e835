"""Helpers for the formats tests: synthetic adapters on the real SD1.5 / SD2.1 / SDXL module trees."""

from __future__ import annotations

import torch

from difflora.adapter.spec import TEXT_ENCODER_TARGETS, UNET_TARGETS
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.formats.reference import components_of, reference_modules

ATTENTION = (*UNET_TARGETS, *TEXT_ENCODER_TARGETS)


def is_attention(path: str) -> bool:
    return any(path == t or path.endswith("." + t) for t in ATTENTION)


def synthetic_adapter(
    family: str, *, rank: int = 2, alpha: float = 3.0, seed: int = 0, select=is_attention, **meta
) -> Adapter:
    """Random A and B (B non-zero, so ΔW is not trivially 0) for every selected module of `family`."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component in components_of(family):
        for path, info in reference_modules(family, component).items():
            if not select(path):
                continue
            kernel = info.kernel if info.kind == "conv" else ()
            down = torch.randn(rank, info.in_features, *kernel, generator=generator) * 0.1
            up_shape = (info.out_features, rank, 1, 1) if info.kind == "conv" else (info.out_features, rank)
            up = torch.randn(*up_shape, generator=generator) * 0.1
            modules[f"{component}.{path}"] = LoraWeights(down=down, up=up, alpha=alpha)
    return Adapter(modules=modules, meta=AdapterMeta(name=f"{family}-test", base_family=family, **meta))
