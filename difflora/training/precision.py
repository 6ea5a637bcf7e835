"""What a mixed-precision choice costs on the device it runs on, said in the plan before the first step."""

from __future__ import annotations

import torch

# Measured on this project's 2-core AMD EPYC (AVX2, no AVX512-BF16/AMX), torch 2.13 CPU, one thread: a
# 640-channel 3x3 convolution at 16x16 takes 0.16 s in float32 and 17.7 s under bf16 autocast (18.6 s fp16):
# oneDNN has no half-precision kernels for such CPUs and falls back to reference code.
SLOWDOWN_WITHOUT_CPU_SUPPORT = 100


def cpu_lacks_half_precision(precision: str) -> bool:
    """Whether this CPU has no native kernels for `precision` ("bf16"/"fp16"; "no" never lacks any)."""
    if precision == "no":
        return False
    # torch has no public query; this private op answers what oneDNN will use (pinned torch, see constraints.txt).
    probe = {
        "bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
        "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported,
    }[precision]
    try:
        return not probe()
    except (AttributeError, RuntimeError):  # a torch without the op: assume the kernels are there
        return False


def precision_note(precision: str, device: torch.device) -> str | None:
    """A plan note when half precision will run on a CPU without its instructions, else None."""
    if device.type != "cpu" or not cpu_lacks_half_precision(precision):
        return None
    return (
        f"{precision} on a CPU without {precision} instructions: convolutions run about "
        f"{SLOWDOWN_WITHOUT_CPU_SUPPORT}x slower than float32 here; --mixed-precision no is faster unless "
        "memory forces half precision"
    )
