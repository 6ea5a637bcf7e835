"""Advice where the user looks: one line each, in the plan before training and beside the gradient
monitor's warnings after it, saying what to change. `--quiet-advice` silences every line of it.

The usual ranges are the LoRA literature's and the trainers' defaults: rank 4-32 for a concept or style
(the update is low-rank; `difflora inspect --spectrum` measures how low), alpha between rank/4 and 4·rank
(kohya's docs recommend rank/2 or rank; alpha 1 with a large rank is kohya's default and the common cause of
"it learns nothing"), and a learning rate within 10x of the model family's default for AdamW.
"""

from __future__ import annotations

HIGH_RANK = 64
SCALE_RANGE = (0.25, 4.0)  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
LR_FACTOR = 10.0  # how far from the family's default learning rate is unusual


def rank_advice(rank: int) -> str | None:
    if rank < HIGH_RANK:
        return None
    return (
        f"rank {rank} is high: LoRA updates are low-rank and 4-32 usually suffice; after training, "
        "`difflora inspect --spectrum` shows the rank the update needs (and the merge that keeps it)"
    )


def scale_advice(rank: int, alpha: float, rslora: bool) -> str | None:
    scale = alpha / (rank**0.5 if rslora else rank)
    low, high = SCALE_RANGE
    if low <= scale <= high:
        return None
    fix = f"--alpha {rank / 2:g} to {rank:g}" if not rslora else f"--alpha {rank**0.5 / 2:g} to {rank**0.5:g}"
    effect = (
        "barely moves the weights (raise the learning rate to make up, or"
        if scale < low
        else "amplifies every step (lower the learning rate to make up, or"
    )
    return f"alpha/rank = {scale:g} is outside the usual {low:g}-{high:g}: the update {effect} set {fix})"


def learning_rate_advice(learning_rate: float, default: float, optimizer: str, model: str) -> str | None:
    ratio = learning_rate / default
    if 1 / LR_FACTOR <= ratio <= LR_FACTOR:
        return None
    effect = "may diverge" if ratio > 1 else "may learn nothing in this many steps"
    return (
        f"learning rate {learning_rate:g} is {ratio:.3g}x the usual {default:g} for {optimizer} on a {model} "
        f"model and {effect}: try --learning-rate {default:g}"
    )


def plan_advice(
    *,
    rank: int,
    alpha: float,
    rslora: bool,
    learning_rate: float,
    default_lr: float,
    optimizer: str,
    model: str,
) -> list[str]:
    """The plan's advice lines (none when every setting is in its usual range)."""
    found = (
        rank_advice(rank),
        scale_advice(rank, alpha, rslora),
        learning_rate_advice(learning_rate, default_lr, optimizer, model),
    )
    return [line for line in found if line]


def gradient_advice(kind: str, learning_rate: float) -> str:
    """What to do about layers whose gradients vanished or exploded (`kind`)."""
    if kind == "vanishing":
        return (
            "those layers barely learn: drop them from the targets (--unet-targets without them) to save "
            "time, or raise --alpha so their update counts"
        )
    return (
        f"those layers dominate the update: lower the learning rate (--learning-rate {learning_rate / 10:g}) or "
        "drop them from the targets"
    )
