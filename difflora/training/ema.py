"""--ema: an exponential moving average of the LoRA weights, kept in float32 beside the trained ones.

After every optimizer step that was taken, average ← d·average + (1 - d)·weights, with diffusers' EMAModel
schedule (its default, without `use_ema_warmup`): d = 0 at the first update, then min(decay, (1+n)/(10+n))
at the n-th after it, so the average does not start by remembering the zero-initialised B for thousands of
steps (tests/test_ema.py holds it to EMAModel's numbers).

Our own rather than EMAModel because EMAModel updates its copy in place on the parameters' device:
`--ema-on-cpu` keeps the average in CPU memory (a Flux LoRA's average need not take GPU memory), which
needs the weights copied to the CPU first; and a checkpoint stores the average by parameter name, so a
resumed run restores it exactly whatever order the parameters come in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from difflora.errors import ConfigError


class WeightAverage:
    """The moving average of `parameters` (by name), in float32 on `device`."""

    def __init__(self, parameters: Mapping[str, torch.Tensor], decay: float, device: torch.device) -> None:
        self.decay, self.device, self.updates = decay, device, 0
        self.average = {
            name: p.detach().to(device=device, dtype=torch.float32, copy=True)
            for name, p in parameters.items()
        }

    def decay_at(self, update: int) -> float:
        """EMAModel's decay for its `update`-th step (1-based): 0 first, then min(decay, (1+n)/(10+n))."""
        n = update - 1
        return 0.0 if n <= 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, parameters: Mapping[str, torch.Tensor]) -> None:
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)  # average + weight·(p - average) = d·average + (1-d)·p
        names = list(self.average)
        current = [parameters[name].detach().to(self.device, torch.float32) for name in names]
        torch._foreach_lerp_([self.average[name] for name in names], current, weight)

    @contextmanager
    def applied(self, parameters: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """The average in the model's parameters for the block (sample grids, validation, the .ema file),
        the trained values restored after, bit for bit."""
        kept = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self.average[name].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(kept[name])

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (difflora.training.checkpoint splits tensors from the rest)."""
        return {"decay": self.decay, "updates": self.updates, "average": dict(self.average)}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        if state is None:
            raise ConfigError("The checkpoint has no --ema average: resume with the run's own settings.")
        self.updates = int(state["updates"])
        self.average = {name: t.to(self.device, torch.float32) for name, t in state["average"].items()}
