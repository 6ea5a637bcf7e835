"""Which LoRA variants of `difflora train` combine: --adaptive-rank's own knobs and the variants peft's
AdaLoRA cannot take, and DoRA on a quantized base. Kept apart from the field list in `train.py`."""

from __future__ import annotations

from typing import Protocol

from difflora.config import Problems


class TrainConfig(Protocol):
    """What these checks read of difflora.config.train.TrainConfig (a protocol: train.py imports this
    module, so it cannot be imported back)."""

    rank: int
    rslora: bool
    dora: bool
    loraplus_ratio: float
    conv_rank: int | None
    quantize_base: str | None
    adaptive_rank: bool
    algo: str
    factor: int

    @property
    def effective_adaptive_init_rank(self) -> int: ...
    @property
    def adaptive_fractions(self) -> tuple[float, float, float]: ...
    @property
    def effective_adaptive_orth_reg(self) -> float: ...


ALGOS: tuple[str, ...] = ("lora", "lokr", "loha")


def check_variants(config: TrainConfig, p: Problems) -> None:
    _check_adaptive(config, p)
    _check_algo(config, p)
    p.check(
        not (config.dora and config.quantize_base),
        "dora",
        "cannot be combined with --quantize-base: DoRA re-normalises the whole weight, which peft would have "
        "to dequantize from bitsandbytes' layers every step (it fails on them); train DoRA on the full base",
    )


def _check_adaptive(config: TrainConfig, p: Problems) -> None:
    """--adaptive-rank's knobs, and the variants peft's AdaLoRA cannot combine with."""
    if not config.adaptive_rank:
        for name in ("init_rank", "warmup", "final", "interval", "orth_reg"):
            if getattr(config, f"adaptive_{name}") is not None:
                p.add(
                    f"adaptive_{name}",
                    "given without --adaptive-rank: add --adaptive-rank to prune ranks",
                )
        return
    init, (warmup, final, interval) = config.effective_adaptive_init_rank, config.adaptive_fractions
    p.check(init > config.rank, "adaptive_init_rank", f"must be above --rank ({config.rank}), got {init}")
    p.check(0.0 <= warmup < 1.0, "adaptive_warmup", f"must be in [0, 1), got {warmup}")
    p.check(0.0 <= final < 1.0, "adaptive_final", f"must be in [0, 1), got {final}")
    p.check(
        warmup + final < 1.0,
        "adaptive_final",
        f"--adaptive-warmup {warmup:g} + --adaptive-final {final:g} leave no steps to prune ranks in",
    )
    p.check(0.0 < interval <= 1.0, "adaptive_interval", f"must be in (0, 1], got {interval}")
    p.check(config.effective_adaptive_orth_reg >= 0, "adaptive_orth_reg", "must be 0 or more")
    # peft's SVD layers start every module at one rank and scale by alpha/rank only.
    for name, clash, why in (
        (
            "conv_rank",
            config.conv_rank is not None,
            "ranks are allocated: add conv1 conv2 to --unet-targets",
        ),
        ("rslora", config.rslora, "peft's AdaLoRA scales updates by alpha/rank only"),
        ("dora", config.dora, "peft's AdaLoRA has no magnitude vector (it refuses use_dora)"),
        (
            "loraplus_ratio",
            config.loraplus_ratio != 1,
            "AdaLoRA's A and B are singular vectors, not up/down",
        ),
    ):
        p.check(not clash, name, f"cannot be combined with --adaptive-rank: {why}")


def _check_algo(config: TrainConfig, p: Problems) -> None:
    """--algo lokr|loha (peft's LoKr/LoHa layers) and what only LoRA layers have."""
    p.check(config.algo in ALGOS, "algo", f"must be one of {', '.join(ALGOS)}, got {config.algo!r}")
    p.check(
        config.factor == -1 or (config.algo == "lokr" and config.factor >= 1),
        "factor",
        f"is LoKr's Kronecker factor: at least 1 with --algo lokr (-1: balanced), got {config.factor}",
    )
    if config.algo == "lora" or config.algo not in ALGOS:
        return
    for name, clash, why in (
        ("rslora", config.rslora, "LoKr/LoHa scale by alpha/rank"),
        ("dora", config.dora, "peft's LoKr/LoHa layers have no magnitude"),
        ("loraplus_ratio", config.loraplus_ratio != 1, "LoKr/LoHa factors are not up/down"),
        ("adaptive_rank", config.adaptive_rank, "AdaLoRA is a LoRA variant"),
        ("conv_rank", config.conv_rank is not None, "add conv1 conv2 to --unet-targets (one rank for all)"),
        ("quantize_base", bool(config.quantize_base), "peft's LoKr/LoHa layers do not wrap quantized layers"),
    ):
        p.check(not clash, name, f"cannot be combined with --algo {config.algo}: {why}")
