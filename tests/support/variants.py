"""The short training run the variant tests share: the embedded model on sample_data/style, a few steps at
rank 4 / alpha 8 on the attention projections, one thread, no checkpoints or sample grids in between; each
test overrides what its variant needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflora.config.train import TrainConfig
from tests.support.paths import SAMPLE_DATA

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
RANK, ALPHA = 4, 8.0


def variant_config(out: Path, cache_dir: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        data_dir=str(SAMPLE_DATA / "style"),
        output_dir=str(out),
        cache_dir=str(cache_dir),
        max_steps=2,
        save_every=0,
        sample_every=0,
        num_threads=1,
        rank=RANK,
        alpha=ALPHA,
        unet_targets=ATTENTION,
    )
    return TrainConfig(**(values | changes))
