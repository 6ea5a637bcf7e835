"""MergeConfig: every knob of `difflora merge`, one field each; the string under a field is its flag's help."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from difflora.config import Problems, coerce_to_tuples
from difflora.config.generate import check_spec
from difflora.config.spec import AdapterWeight, parse_adapter_weights


@dataclass(frozen=True)
class MergeConfig:
    adapters: tuple[str, ...] = ()
    """Adapters to merge with their weights: NAME[:WEIGHT[:TE_WEIGHT]],..."""
    output: str = ""
    """The merged adapter file (.safetensors)."""
    rank: int | None = None
    """Truncate each layer to this rank by SVD and report its error. Default: exact (ranks concatenated)."""
    adapter_dir: tuple[str, ...] = ()
    """Extra folders searched for adapters by name (./adapters always is)."""
    into_base: str | None = None
    """Bake the adapters into this single-file base checkpoint (ldm/sgm .safetensors) and write a checkpoint."""

    def __post_init__(self) -> None:
        coerce_to_tuples(self, "adapters", "adapter_dir")
        p = Problems()
        check_spec(p, "adapters", lambda: self.adapter_weights)
        p.check(bool(self.adapters), "adapters", "give at least one adapter to merge")
        p.check(bool(self.output), "output", "give the output file (-o merged.safetensors)")
        if self.output:
            p.check(self.output.endswith(".safetensors"), "output", "must end with .safetensors")
        if self.rank is not None:
            p.check(self.rank >= 1, "rank", f"must be at least 1, got {self.rank}")
            p.check(self.into_base is None, "rank", "a baked base holds the exact update: leave --rank out")
        if self.into_base is not None:
            p.check(self.into_base.endswith(".safetensors"), "into_base", "must be a .safetensors checkpoint")
        p.raise_if_any("merge")

    @cached_property
    def adapter_weights(self) -> tuple[AdapterWeight, ...]:
        """The adapters as AdapterWeights, parsed once by the validation above."""
        return tuple(parse_adapter_weights(self.adapters))
