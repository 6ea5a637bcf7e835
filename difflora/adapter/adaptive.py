"""Adaptive rank (--adaptive-rank): peft's AdaLoRA on the same targets as plain LoRA, and the rank
allocation the training loop drives.

`add_adalora` builds peft's AdaLoraModel on a component: SVD-form layers (A, E, B; `svd.py`) at the initial
rank on the target modules, and peft's RankAllocator. The AdaLoraModel is kept only as the allocator's
owner: the component itself, its layers replaced in place, is what trains and what Accelerate prepares,
exactly like a plain-LoRA component.

`RankAllocation` is what the loop calls: `penalty()`, AdaLoRA's orthogonality regulariser for the loss
(peft adds it only inside AdaLoraModel.forward, to an output's `.loss`, which a UNet output has not), and
`update(step)` after each optimizer step and before zero_grad: peft's update_and_allocate, which scores
every rank component and zeroes E of the least important ones down to the step's budget. Each component
(UNet, each trained text encoder) has its own budget: its modules average `target_rank` at the end.
`state()` / `load_state()` carry the allocator's importance averages and rank pattern through checkpoints,
so a resumed run prunes exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import AdaLoraConfig, AdaLoraModel
from peft.tuners.adalora import AdaLoraLayer
from torch import nn

from difflora.adapter.inject import DEFAULT_ADAPTER, resolve_targets
from difflora.adapter.names import classic_name
from difflora.adapter.spec import LoraSpec
from difflora.adapter.svd import kept_components
from difflora.errors import ConfigError


@dataclass(frozen=True)
class RankSchedule:
    """AdaLoRA's schedule in optimizer steps (1-based, as the loop counts them): steps 1..warmup_steps
    train at init_rank, pruning runs every `interval` steps until `final_allocation_step` fixes the ranks
    at the target budget, and the last `final_steps` steps train those ranks."""

    init_rank: int
    target_rank: int
    total_steps: int
    warmup_steps: int  # peft's tinit
    final_steps: int  # peft's tfinal
    interval: int  # peft's deltaT
    orth_reg: float  # peft's orth_reg_weight

    @classmethod
    def for_run(
        cls,
        total_steps: int,
        *,
        init_rank: int,
        target_rank: int,
        fractions: tuple[float, float, float],
        orth_reg: float,
    ) -> RankSchedule:
        """The schedule from fractions of the run, so it fits any length: warm-up + final fractions below 1
        (the config checks it) always leave the final allocation after the warm-up, as peft requires."""
        warmup, final, interval = fractions
        return cls(
            init_rank=init_rank,
            target_rank=target_rank,
            total_steps=total_steps,
            warmup_steps=math.floor(warmup * total_steps),
            final_steps=math.floor(final * total_steps),
            interval=max(1, round(interval * total_steps)),
            orth_reg=orth_reg,
        )

    @property
    def final_allocation_step(self) -> int:
        return self.total_steps - self.final_steps

    def describe(self) -> str:
        return (
            f"AdaLoRA (ranks from {self.init_rank} to an average of {self.target_rank} per module: pruned "
            f"every {self.interval} step(s) from step {self.warmup_steps + 1}, fixed at step "
            f"{self.final_allocation_step}; orthogonality penalty {self.orth_reg:g})"
        )


def add_adalora(
    model: nn.Module, component: str, spec: LoraSpec, *, adapter_name: str = DEFAULT_ADAPTER
) -> tuple[list[str], AdaLoraModel]:
    """Inject trainable AdaLoRA layers into `model` in place, starting at `spec.adaptive_init_rank` and
    pruned towards an average of `spec.rank`, and freeze the rest; returns the live names of the adapted
    modules and the peft tuner that owns the rank allocator (its schedule is set later by RankAllocation,
    once the run's length is known: until then a placeholder one-step schedule)."""
    targets = spec.targets(component)
    matched = resolve_targets(model, targets, component=component)
    init_rank = spec.adaptive_init_rank or spec.rank
    config = AdaLoraConfig(
        init_r=init_rank,
        target_r=spec.rank,
        # peft scales by lora_alpha / init_rank: this keeps plain LoRA's alpha/rank, so --alpha and the
        # learning rate mean what they mean without --adaptive-rank.
        lora_alpha=spec.alpha * init_rank / spec.rank,
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        total_step=1,
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    tuner = AdaLoraModel(model, config, adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name and f".{adapter_name}." in name + ".")
    return matched, tuner


def svd_layers(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, AdaLoraLayer]:
    """The model's AdaLoRA layers holding `adapter_name`, by live module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_A
    }


class RankAllocation:
    """The AdaLoRA tuners of one run, by component, driven on one schedule."""

    def __init__(
        self,
        tuners: Mapping[str, AdaLoraModel],
        schedule: RankSchedule,
        adapter_name: str = DEFAULT_ADAPTER,
    ):
        self.tuners = dict(tuners)
        self.schedule = schedule
        self.adapter_name = adapter_name
        self.finalized = dict.fromkeys(self.tuners, False)
        for tuner in self.tuners.values():
            config = tuner.peft_config[adapter_name]
            config.tinit, config.tfinal = schedule.warmup_steps, schedule.final_steps
            config.deltaT, config.orth_reg_weight = schedule.interval, schedule.orth_reg
            tuner.rankallocator.set_total_step(schedule.total_steps)

    def penalty(self) -> torch.Tensor:
        """orth_reg · mean over every A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (AdaLoRA's regulariser: keeps
        A's rows and B's columns near-orthonormal, so E holds the singular values the pruning ranks).
        Computed in float32 outside autocast: the matrices are float32 trainable weights."""
        terms = []
        for tuner in self.tuners.values():
            for layer in svd_layers(tuner.model, self.adapter_name).values():
                a, b = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
                with torch.autocast(device_type=a.device.type, enabled=False):
                    for gram in (a @ a.T, b.T @ b):
                        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                        terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.schedule.orth_reg * torch.stack(terms).mean()

    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based) and before zero_grad: peft's update_and_allocate. Skipped
        steps (the NaN guard) have no gradients to score, so the loop does not call this for them; if the
        final allocation's own step was one, it is done at the next good step instead."""
        final = self.schedule.final_allocation_step
        for component, tuner in self.tuners.items():
            at = step
            if step > final and not self.finalized[component]:
                if not tuner.rankallocator.exp_avg_ipt:
                    continue  # no step was good yet: nothing to rank by, ranks stay as they are
                at = final
            tuner.update_and_allocate(at)
            self.finalized[component] = self.finalized[component] or at == final

    def ranks(self) -> dict[str, dict[str, int]]:
        """component -> classic module name -> current rank (rank components not pruned)."""
        return {
            component: {
                classic_name(component, name, tuner.model): int(
                    kept_components(layer, self.adapter_name).numel()
                )
                for name, layer in svd_layers(tuner.model, self.adapter_name).items()
            }
            for component, tuner in self.tuners.items()
        }

    def summary(self) -> dict[str, dict[str, float]]:
        """Per component: modules, min/mean/max rank and how many were pruned to rank 0 (not written)."""
        result = {}
        for component, ranks in self.ranks().items():
            values = list(ranks.values())
            result[component] = {
                "modules": len(values),
                "min": min(values),
                "mean": round(statistics.fmean(values), 3),
                "max": max(values),
                "pruned_to_zero": sum(1 for v in values if v == 0),
            }
        return result

    def describe(self) -> str:
        """One line for the end of training: the final ranks per component."""
        parts = [
            f"{component.replace('_', ' ')} {s['modules']} modules, rank min {s['min']} / mean "
            f"{s['mean']:g} / max {s['max']}"
            + (f", {s['pruned_to_zero']} pruned to 0 (left out of the file)" if s["pruned_to_zero"] else "")
            for component, s in self.summary().items()
        ]
        return f"adaptive rank (from {self.schedule.init_rank}): " + "; ".join(parts)

    # ------------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the A, E, B parameters (ranknum is always the initial rank)."""
        components = {}
        for component, tuner in self.tuners.items():
            allocator = tuner.rankallocator
            components[component] = {
                "finalized": self.finalized[component],
                "ipt": dict(allocator.ipt),
                "exp_avg_ipt": dict(allocator.exp_avg_ipt),
                "exp_avg_unc": dict(allocator.exp_avg_unc),
                "rank_pattern": tuner.peft_config[self.adapter_name].rank_pattern,
            }
        return {"schedule": asdict(self.schedule), "components": components}

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Restore `state()`; refuses a checkpoint pruned on another schedule (another run length)."""
        if state is None:
            raise ConfigError(
                "Cannot --resume with --adaptive-rank: the checkpoint has no rank-allocation state (it was "
                "written by a difflora without it); start a fresh run without --resume."
            )
        saved = RankSchedule(**state["schedule"])
        if saved != self.schedule:
            raise ConfigError(
                "Cannot --resume: --adaptive-rank prunes ranks on a schedule that is a fraction of the run, "
                f"and the checkpoint's ({saved.total_steps} steps: {saved.describe()}) differs from this "
                f"run's ({self.schedule.total_steps} steps: {self.schedule.describe()}). Resume with the "
                "run's own --max-steps/--epochs, or start a fresh run."
            )
        for component, tuner in self.tuners.items():
            saved_component = state["components"][component]
            allocator = tuner.rankallocator
            device = next(tuner.model.parameters()).device
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(allocator, key, {n: t.to(device) for n, t in saved_component[key].items()})
            tuner.peft_config[self.adapter_name].rank_pattern = saved_component["rank_pattern"]
            self.finalized[component] = bool(saved_component["finalized"])
