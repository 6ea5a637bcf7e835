"""`--blocks-to-swap N` (kohya's name): the frozen weights of the denoiser's last N transformer blocks live in
CPU memory (pinned) and are copied onto the GPU for the block's forward and again for its backward, on a
side CUDA stream so that the copy of the next block overlaps the current block's compute. The LoRA
parameters of those blocks never move: they stay on the GPU in float32, where the optimizer updates them.

Why not diffusers' group offloading (`diffusers.hooks.group_offloading`, `enable_group_offload`), read in
0.42.1: it is built for inference. (1) Its hooks onload a group before the forward and offload it right
after; autograd keeps the very Parameter objects a layer used for its backward, so the backward would meet
weights that are back on the CPU, and no hook brings them back (nothing runs at backward time). (2) With
`use_stream` its offload restores the pinned CPU copy taken at set-up (`param.data = cpu_param_dict[param]`)
instead of copying back: any LoRA weight inside a group would silently return to its initial value after
each forward, and the optimizer would step tensors that have changed device. (3) Its prefetching follows
the forward's execution order; a backward runs the blocks in reverse.

How it works: a forward pre-hook on each swapped block makes its weights resident (waiting for the copy
started earlier) and starts the copy of the next swapped block; a forward hook drops the GPU copy again
(`tensor.data = home`, so autograd, which holds the same Parameter, reads whatever is resident when it
runs) and wraps the block's outputs in an identity whose backward brings the block back (and starts the
copy of the previous one) before the block's own backward; the block's inputs are wrapped in an identity
whose backward drops it once the gradient has left the block. Under gradient checkpointing the block's
recomputation happens inside its backward, while it is resident. `finish()` after each backward drops
whatever is left (a block whose inputs need no gradient).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def swappable_blocks(denoiser: nn.Module, lists: Sequence[str]) -> list[nn.Module]:
    """The blocks a family declares swappable (`ModelFamily.swappable_blocks`), in forward order."""
    return [block for name in lists for block in getattr(denoiser, name)]


def frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    """What a swap moves: the block's parameters that do not train, and its buffers (float8 bits)."""
    frozen = [p for p in block.parameters() if not p.requires_grad]
    return frozen + list(block.buffers())


@dataclass
class _Block:
    index: int
    module: nn.Module
    homes: list[tuple[torch.Tensor, torch.Tensor]]  # (the model's tensor, its CPU home copy)
    copies: list[torch.Tensor] | None = None  # the onload device copies while resident or in flight
    event: Any = None  # the CUDA event that marks the copy done
    handles: list[Any] = field(default_factory=list)


class BlockSwap:
    """Keeps `blocks`' frozen weights at home in CPU memory and resident on `device` only around their
    forward and backward (see the module docstring). `device` may be the CPU (tests: resident copies are
    then distinct tensors, so where each weight is stays observable). `events` records each onload and
    offload as ("on"|"off", block index) when a list is given."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device, events: list | None = None) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.events = events
        self.blocks = [_Block(i, block, self._homes(block)) for i, block in enumerate(blocks)]
        for state in self.blocks:
            state.handles = [
                state.module.register_forward_pre_hook(self._pre_hook(state), with_kwargs=True),
                state.module.register_forward_hook(self._post_hook(state)),
            ]

    def _homes(self, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each frozen tensor's CPU copy (pinned under CUDA, so copies can run asynchronously); the model's
        tensor points at its home between uses."""
        homes = []
        for tensor in frozen_tensors(block):
            home = tensor.data.to("cpu")
            if self.stream is not None:
                home = home.pin_memory()
            tensor.data = home
            homes.append((tensor, home))
        return homes

    @property
    def resident(self) -> list[int]:
        """Indices of the blocks whose weights are on the onload device (or being copied there)."""
        return [state.index for state in self.blocks if state.copies is not None]

    def _onload(self, state: _Block) -> None:
        """Start copying `state`'s weights to the device (on the side stream under CUDA)."""
        if state.copies is not None or not state.homes:
            return
        if self.stream is None:
            state.copies = [home.to(self.device, copy=True) for _, home in state.homes]
        else:
            with torch.cuda.stream(self.stream):
                state.copies = [home.to(self.device, non_blocking=True) for _, home in state.homes]
                state.event = torch.cuda.Event()
                state.event.record(self.stream)
        self._log("on", state)

    def _ready(self, state: _Block) -> None:
        """Make `state` resident for compute: onload if needed, wait for its copy, point the model at it."""
        self._onload(state)
        if state.copies is None:
            return
        if state.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(state.event)
            for copy in state.copies:
                copy.record_stream(current)  # made on the side stream, used (and freed) on this one
            state.event = None
        for (tensor, _), copy in zip(state.homes, state.copies, strict=True):
            tensor.data = copy

    def _offload(self, state: _Block) -> None:
        """Point the model back at the home copies; the device copies are freed (frozen: nothing to save)."""
        if state.copies is None:
            return
        for tensor, home in state.homes:
            tensor.data = home
        state.copies, state.event = None, None
        self._log("off", state)

    def _log(self, what: str, state: _Block) -> None:
        if self.events is not None:
            self.events.append((what, state.index))

    def _neighbour(self, state: _Block, step: int) -> _Block | None:
        index = state.index + step
        return self.blocks[index] if 0 <= index < len(self.blocks) else None

    def _pre_hook(self, state: _Block):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._ready(state)
            if _in_backward():  # gradient checkpointing recomputes the block inside its backward
                return args, kwargs
            following = self._neighbour(state, 1)
            if following is not None:
                self._onload(following)
            return _wrap(partial(self.after_backward, state), args, kwargs)

        return hook

    def _post_hook(self, state: _Block):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if _in_backward():
                return output
            self._offload(state)
            return _wrap(partial(self.before_backward, state), output, None)[0]

        return hook

    def before_backward(self, state: _Block) -> None:
        self._ready(state)
        previous = self._neighbour(state, -1)
        if previous is not None:
            self._onload(previous)

    def after_backward(self, state: _Block) -> None:
        self._offload(state)

    def finish(self) -> None:
        """After a backward: drop every block still resident (one whose inputs needed no gradient)."""
        for state in self.blocks:
            self._offload(state)

    def remove(self) -> None:
        """Remove the hooks and leave every frozen weight on the device (before the model is reused)."""
        for state in self.blocks:
            for handle in state.handles:
                handle.remove()
            for tensor, home in state.homes:
                tensor.data = home.to(self.device)
            state.copies = None


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (checkpointing's recomputation)."""
    return torch._C._current_graph_task_id() != -1


class _OnBackward(torch.autograd.Function):
    """Identity on some tensors whose backward first calls `callback`: on a block's outputs it runs before
    the block's own backward (bring the block back), on its inputs once the gradient has left it (drop it)."""

    @staticmethod
    def forward(ctx: Any, callback: Callable[[], None], *tensors: torch.Tensor) -> tuple:
        ctx.callback = callback
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        ctx.callback()
        return (None, *grads)


def _wrap(callback: Callable[[], None], args: Any, kwargs: dict | None) -> tuple:
    """`args` (a tensor, or a tuple of values) and `kwargs` with every tensor that needs a gradient passed
    through one `_OnBackward` node calling `callback`; unchanged when none does (no_grad forwards, samples)."""
    single = isinstance(args, torch.Tensor)
    values = [args] if single else list(args)
    keys = list(kwargs) if kwargs else []
    every = values + [kwargs[k] for k in keys]
    chosen = [i for i, v in enumerate(every) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not chosen or not torch.is_grad_enabled():
        return args, kwargs
    wrapped = _OnBackward.apply(callback, *(every[i] for i in chosen))
    for i, tensor in zip(chosen, wrapped, strict=True):
        every[i] = tensor
    new_args: Any = every[0] if single else type(args)(every[: len(values)])
    new_kwargs = dict(zip(keys, every[len(values) :], strict=True)) if kwargs is not None else None
    return new_args, new_kwargs


def blocks_for_swap(denoiser: nn.Module, family: Any, count: int) -> list[nn.Module]:
    """The last `count` of the blocks `family` declares swappable, or one line saying why there are none."""
    from difflora.errors import ConfigError

    blocks = swappable_blocks(denoiser, family.swappable_blocks)
    if not blocks:
        raise ConfigError(
            f"--blocks-to-swap: {family.label} has no swappable transformer blocks; leave it out."
        )
    if count > len(blocks):
        raise ConfigError(
            f"--blocks-to-swap {count}: {family.label} has {len(blocks)} blocks; give at most that."
        )
    return blocks[len(blocks) - count :]


def move_except(module: nn.Module, blocks: Sequence[nn.Module], device: torch.device) -> None:
    """`module.to(device)` except the frozen tensors of `blocks`, which stay in CPU memory: a model larger
    than the GPU never has to fit on it whole."""
    staying = {id(tensor) for block in blocks for tensor in frozen_tensors(block)}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in staying:
            tensor.data = tensor.data.to(device)
