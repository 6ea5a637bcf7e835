"""`--blocks double=0-3,7`: which numbered transformer blocks a run adapts, by the family's block kinds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from difflora.errors import ConfigError


def block_filter(specs: Sequence[str], lists: Mapping[str, str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """`--blocks double=0-3,7` -> (("transformer_blocks", (0, 1, 2, 3, 7)),): each kind's module list (as
    the family names it) with the block indices kept."""
    found = []
    for spec in specs:
        kind, _, ranges = spec.partition("=")
        if kind not in lists:
            known = ", ".join(lists) or "none (it has no numbered transformer blocks)"
            raise ConfigError(f"--blocks {spec}: the model's block kinds are {known}.")
        indices: list[int] = []
        for part in ranges.split(","):
            low, _, high = part.strip().partition("-")
            indices.extend(range(int(low), int(high or low) + 1))
        found.append((lists[kind], tuple(sorted(set(indices)))))
    return tuple(found)
