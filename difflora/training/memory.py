"""The estimated peak memory of a training step, printed in the plan: where the run's tensors live on the
training device (GPU memory under CUDA, resident memory on the CPU, where the libraries come on top).

- weights: every tensor of the pipeline's components as they are stored when the plan is made (the storage
  dtype: bf16, float32, float8 bits, int8/nf4; the VAE's encoder and any freed text encoder are gone by then),
  less what `--blocks-to-swap` keeps in CPU memory, plus the two swapped blocks that can be resident at once.
- LoRA: each trainable parameter with its gradient and the optimizer's two moments (AdamW: 4 + 4 + 8 bytes
  per float32 parameter; 8-bit AdamW 4 + 4 + 2).
- activations: the tensors autograd saves for the backward in one forward at the run's batch and size,
  counted on a copy of the denoiser on the meta device (no memory, no compute): the upcast weights of float8
  layers, which autograd keeps too, included; attention is counted as a fused kernel keeps it (query, key,
  value, output and the log-sum-exp, never the L x L matrix the meta device's math fallback would save). With gradient checkpointing the family's block lists are the
  checkpointed units: what is saved outside them, each block's inputs, and one block recomputed at a time.
  The backward's transient gradient buffers and the allocator's slack come on top: on a CPU run of the tiny
  Flux the measured growth of peak memory was 2.2-2.4x the estimated activations' (tests/test_memory_estimate.py),
  so read the figure as a lower bound.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from difflora.training.block_swap import BlockSwap, swappable_blocks

GIB = 2**30
LORA_BYTES = {"adamw": 16, "adamw8bit": 10}  # per float32 parameter: itself, its gradient, two moments


@dataclass(frozen=True)
class Activations:
    total: int  # bytes saved for the backward by one forward, no checkpointing
    outside: int  # of which outside the block lists
    blocks: tuple[int, ...]  # saved inside each block
    block_inputs: tuple[int, ...]  # each block's inputs (what checkpointing keeps of it)

    def checkpointed(self) -> int:
        """Saved outside the blocks + every block's inputs + the largest block recomputed in the backward."""
        if not self.blocks:
            return self.total
        return self.outside + sum(self.block_inputs) + max(self.blocks)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes resident on the device
    swapped: int  # bytes --blocks-to-swap keeps in CPU memory (net of the resident blocks)
    lora: int
    activations: Activations
    checkpointing: bool
    device: str

    @property
    def peak(self) -> int:
        return self.weights + self.lora + self.activation_bytes

    @property
    def activation_bytes(self) -> int:
        return self.activations.checkpointed() if self.checkpointing else self.activations.total

    def describe(self) -> str:
        """One plan line."""
        acts = self.activations
        if not acts.blocks:  # a family without block lists (SD's UNets): checkpointing is not modelled
            kind = "without checkpointing; a UNet's checkpointed share is not modelled"
        elif self.checkpointing:
            kind = f"checkpointed; {_gib(acts.total)} without"
        else:
            kind = f"{_gib(acts.checkpointed())} with --gradient-checkpointing"
        swap = f"; --blocks-to-swap keeps {_gib(self.swapped)} in CPU memory" if self.swapped else ""
        return (
            f"est. peak {_gib(self.peak)} on {self.device}: weights {_gib(self.weights)} + LoRA with grads "
            f"and optimizer state {_gib(self.lora)} + activations {_gib(self.activation_bytes)} ({kind}){swap}"
        )


def _gib(count: int) -> str:
    """GiB with two decimals, or MiB below 1 GiB (a tiny model's figures)."""
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


def estimate_memory(
    pipe: Any,
    denoiser: nn.Module,
    block_lists: Sequence[str],
    probe: Callable[[nn.Module], Callable[[], Any]],
    *,
    swap: BlockSwap | None,
    checkpointing: bool,
    optimizer: str,
    device: torch.device,
    probe_key: Hashable = None,
) -> MemoryEstimate:
    """The estimate for a set-up run. `probe(model)` returns one forward of `model` at the run's batch and
    size (the family's conditioning knows the inputs); `probe_key`, when given, names those inputs (batch,
    size, conditioning) so that a process planning another run of the same model reuses the count."""
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    trainable += [
        p for name in ("text_encoder", "text_encoder_2", "text_encoder_3") for p in _params(pipe, name)
    ]
    lora = sum(p.numel() for p in trainable if p.requires_grad) * LORA_BYTES.get(optimizer, 16)
    swapped = swap_saving(swap) if swap is not None else 0
    return MemoryEstimate(
        weights=resident_weight_bytes(pipe) - swapped,
        swapped=swapped,
        lora=lora,
        activations=counted_activations(denoiser, block_lists, probe, probe_key),
        checkpointing=checkpointing,
        device=device.type,
    )


def _params(pipe: Any, name: str) -> list[nn.Parameter]:
    module = getattr(pipe, name, None)
    return list(module.parameters()) if isinstance(module, nn.Module) else []


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_weight_bytes(pipe: Any) -> int:
    """Bytes of every frozen tensor of the pipeline's modules (LoRA weights are counted with LoRA)."""
    seen: dict[int, torch.Tensor] = {}
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                if not tensor.requires_grad:
                    seen[id(tensor)] = tensor
    return tensor_bytes(seen.values())


def swap_saving(swap: BlockSwap) -> int:
    """What the swapped blocks keep off the device: all their frozen bytes, less the two neighbouring blocks
    that can be resident at once (the current one and the one being copied)."""
    sizes = [tensor_bytes(home for _, home in state.homes) for state in swap.blocks]
    resident = max((a + b for a, b in itertools.pairwise(sizes)), default=sum(sizes))
    return sum(sizes) - resident


# Counted activations per (model structure, block lists, probe inputs), for this process. Counting costs a
# deep copy and a meta-device forward (about a second on the embedded model, more on a full-size one);
# `difflora train a b c` plans several runs on one base, and the test suite plans hundreds.
_COUNTED: dict[Hashable, Activations] = {}


def counted_activations(
    denoiser: nn.Module,
    block_lists: Sequence[str],
    probe: Callable[[nn.Module], Callable[[], Any]],
    probe_key: Hashable,
) -> Activations:
    if probe_key is None:
        return saved_activations(denoiser, block_lists, probe)
    key = (structure_key(denoiser), tuple(block_lists), probe_key)
    if key not in _COUNTED:
        _COUNTED[key] = saved_activations(denoiser, block_lists, probe)
    return _COUNTED[key]


def structure_key(model: nn.Module) -> tuple:
    """What decides the bytes autograd saves, apart from the inputs: every module's path and class (LoRA,
    DoRA, dropout, float8 and checkpointing wrappers are classes of their own), its attention processor's
    class, and each of its own tensors' shape, dtype and whether it trains."""
    return tuple(
        (
            name,
            type(module).__qualname__,
            type(getattr(module, "processor", None)).__qualname__,
            tuple(
                (tensor_name, tuple(tensor.shape), tensor.dtype, tensor.requires_grad)
                for tensor_name, tensor in [
                    *module.named_parameters(recurse=False),
                    *module.named_buffers(recurse=False),
                ]
            ),
        )
        for name, module in model.named_modules()
    )


def saved_activations(
    denoiser: nn.Module, block_lists: Sequence[str], probe: Callable[[nn.Module], Callable[[], Any]]
) -> Activations:
    """Bytes autograd saves in one forward, counted on a meta-device copy of `denoiser` (its LoRA layers and
    float8 layers included, hooks left out), overall and per block of `block_lists`."""
    model = meta_copy(denoiser)
    blocks = swappable_blocks(model, block_lists) if block_lists else []
    counter = _SavedCounter({id(t) for t in [*model.parameters(), *model.buffers()]})
    inside = [0] * len(blocks)
    inputs = [0] * len(blocks)
    handles = []
    for index, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(_enter(counter, inside, inputs, index), with_kwargs=True)
        )
        handles.append(block.register_forward_hook(_leave(counter, inside, index)))
    with (
        torch.device("meta"),
        torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t),
        mock.patch.object(F, "scaled_dot_product_attention", _fused_attention),
    ):
        probe(model)()
    for handle in handles:
        handle.remove()
    return Activations(counter.total, counter.total - sum(inside), tuple(inside), tuple(inputs))


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s structure whose tensors are on the meta device (its own stay where they are),
    without forward hooks (a swap's hooks would act on the real model) and without gradient checkpointing
    (whose own saved-tensor hooks would hide the blocks' tensors from the count)."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, requires_grad=tensor.requires_grad)
            if isinstance(tensor, nn.Parameter)
            else meta
        )
    model = copy.deepcopy(module, memo)
    for child in model.modules():
        if getattr(child, "gradient_checkpointing", False) is True:  # counted per block instead
            child.gradient_checkpointing = False
        child._forward_pre_hooks.clear()
        child._forward_hooks.clear()
        child._forward_hooks_with_kwargs.clear()
        child._forward_pre_hooks_with_kwargs.clear()
    return model


class _SavedCounter:
    """Sums the bytes of distinct tensors autograd saves, parameters and buffers left out."""

    def __init__(self, own: set[int]) -> None:
        self.own = own
        self.kept: dict[int, torch.Tensor] = {}  # held, so that an id is never reused by another tensor
        self.total = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in self.own and id(base) not in self.kept:
            self.kept[id(base)] = base
            self.total += base.numel() * base.element_size()
        return tensor


def _enter(counter: _SavedCounter, inside: list[int], inputs: list[int], index: int) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inside[index] = -counter.total
        values = [*args, *kwargs.values()]
        inputs[index] = tensor_bytes(v for v in values if isinstance(v, torch.Tensor) and v.requires_grad)

    return hook


def _leave(counter: _SavedCounter, inside: list[int], index: int) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        inside[index] += counter.total

    return hook


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, CUDA's and the CPU's) saves for its backward:
    query, key, value, output and one float32 log-sum-exp per query row. Used on the meta device only."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = query.new_empty((*query.shape[:-1], value.shape[-1]))
        ctx.save_for_backward(
            query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32)
        )
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    return _FusedAttention.apply(query, key, value)
