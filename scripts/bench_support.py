"""What several benchmark scripts measure alike: the mean signature of an adapter's images."""

from __future__ import annotations

from pathlib import Path

SEEDS = (0, 1, 2, 3)


def adapter_signature(pipe, adapter: str | Path | None, prompt: str, measure: str) -> float:
    """`measure` (a function of difflora.embedded.signatures, e.g. "cross_score") averaged over the images of
    `prompt` at SEEDS, 20 steps, with `adapter` composed at weight 1 on `pipe` (None: the base alone)."""
    import numpy as np

    from difflora.composition.composer import compose
    from difflora.config.spec import parse_adapter_weights
    from difflora.embedded import signatures
    from difflora.generation.pipeline import render

    compose(pipe, parse_adapter_weights(f"{adapter}:1" if adapter else ""))
    images = render(pipe, [prompt] * len(SEEDS), seeds=list(SEEDS), steps=20, guidance=5.0)
    return float(np.mean([getattr(signatures, measure)(image) for image in images]))
