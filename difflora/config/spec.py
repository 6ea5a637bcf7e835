"""`--adapters NAME[:WEIGHT[:TE_WEIGHT]],...` and `--sweep NAME:W1,W2,...`: the grammar, parsed into values.

NAME is a path to a `.safetensors` file or the name of an adapter in the adapter folders (finding the file
is difflora.composition.find's job). WEIGHT defaults to 1.0 and may be negative, within ±100
(config.limits); TE_WEIGHT (the text-encoder weight) defaults to WEIGHT and may also be written `te=0.5`, as
A1111 users know it. A Windows drive letter (`C:\\loras\\x.safetensors:0.5`) is part of the name, not a
weight. A leaf beside the job configs that parse their flags with it: below the command line an adapter set
is `Sequence[AdapterWeight]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from difflora.config.blocks import BlockWeights, parse_blocks
from difflora.config.limits import MAX_WEIGHT, weight_problem
from difflora.errors import AdapterSpecError

GRAMMAR = (
    "NAME[:WEIGHT[:TE_WEIGHT]][@BLOCKS][,NAME...]  e.g. style:0.7,subject:0.3:0.5 or style:0.8@out=1,in=0 "
    "(BLOCKS: difflora.config.blocks)"
)
_DRIVE = re.compile(r"^[A-Za-z]$")


@dataclass(frozen=True)
class AdapterWeight:
    """One entry of an adapter spec: which adapter, at which UNet weight and text-encoder weight."""

    name: str
    weight: float = 1.0
    te_weight: float | None = None
    blocks: BlockWeights | None = None
    """Per-block factors (`@out=1,in=0`), multiplying the weight of each block's modules."""

    def block_factor(self, block: str) -> float:
        return self.blocks.factor(block) if self.blocks is not None else 1.0

    @property
    def text_encoder_weight(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    def weight_for(self, component: str) -> float:
        """The weight that applies to a component's modules: the denoiser's ("unet", "transformer") or the
        text encoders' ("text_encoder", "text_encoder_2")."""
        return self.text_encoder_weight if component.startswith("text_encoder") else self.weight

    def __str__(self) -> str:
        text = f"{self.name}:{self.weight:g}"
        text += f":{self.te_weight:g}" if self.te_weight is not None else ""
        return text + (f"@{self.blocks.text}" if self.blocks is not None else "")


def parse_adapter_weights(spec: str | Sequence[str]) -> list[AdapterWeight]:
    """Parse `style:0.7,subject:0.3` (or several such strings, from repeated --adapter flags).
    Raises AdapterSpecError showing the grammar and the bad fragment; the same adapter twice is refused."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    result: list[AdapterWeight] = []
    for text in specs:
        for fragment in _with_blocks(text.split(",")):
            if not fragment.strip():
                if text.strip():
                    raise _spec_error(text, fragment, "empty entry (two commas, or a trailing comma)")
                continue
            result.append(_parse_fragment(fragment.strip()))
    seen: set[str] = set()
    for entry in result:
        if entry.name in seen:
            raise AdapterSpecError(
                f"Adapter {entry.name!r} appears twice in the adapter spec. Give each adapter once, with "
                f"the sum of its weights.\nGrammar: {GRAMMAR}"
            )
        seen.add(entry.name)
    return result


_BLOCK_ITEM = re.compile(r"^\s*([A-Za-z][\w-]*=)?\s*[-+.\deE]+\s*$")


def _with_blocks(fragments: list[str]) -> list[str]:
    """Fragments with a block list's items (`@out=1,mid=0.5` split at its commas) joined back to their entry."""
    joined: list[str] = []
    for fragment in fragments:
        if joined and "@" in joined[-1] and _BLOCK_ITEM.match(fragment):
            joined[-1] += "," + fragment
        else:
            joined.append(fragment)
    return joined


def adapter_set(specs: Sequence[AdapterWeight]) -> list[AdapterWeight]:
    """`specs` as a list. Text is refused rather than parsed: below the command line an adapter set is
    parsed once, where it enters (a config, or the caller's parse_adapter_weights)."""
    if isinstance(specs, str):
        raise TypeError(f"An adapter set is a list of AdapterWeight: pass parse_adapter_weights({specs!r}).")
    return list(specs)


def _parse_fragment(fragment: str) -> AdapterWeight:
    fragment, at, block_text = fragment.partition("@")
    blocks = parse_blocks(block_text) if at else None
    parts = fragment.split(":")
    if len(parts) > 1 and _DRIVE.match(parts[0]) and parts[1][:1] in ("\\", "/"):
        parts = [parts[0] + ":" + parts[1], *parts[2:]]
    name, numbers = parts[0].strip(), parts[1:]
    if not name:
        raise _spec_error(fragment, fragment, "missing adapter name before ':'")
    if len(numbers) > 2:
        raise _spec_error(fragment, fragment, f"{len(numbers)} weights given; at most WEIGHT and TE_WEIGHT")
    weight = _number(numbers[0], fragment, "WEIGHT") if numbers else 1.0
    te_weight = None
    if len(numbers) == 2:
        te_text = numbers[1].strip()
        te_text = te_text[3:] if te_text.lower().startswith("te=") else te_text
        te_weight = _number(te_text, fragment, "TE_WEIGHT")
    return AdapterWeight(name=name, weight=weight, te_weight=te_weight, blocks=blocks)


def _number(text: str, fragment: str, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise _spec_error(fragment, text, f"{what} must be a number") from None
    problem = weight_problem(value)  # 1e308 times an update overflows; past the bound a LoRA is noise
    if problem:
        raise _spec_error(fragment, text, f"{what} {problem}")
    return value


def _spec_error(fragment: str, bad: str, why: str) -> AdapterSpecError:
    return AdapterSpecError(f"Malformed adapter spec {fragment!r}: {why} (at {bad!r}).\nGrammar: {GRAMMAR}")


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """ "style:0,0.5,1" -> ("style", [0.0, 0.5, 1.0]). Each value sets the UNet and text-encoder weight."""
    name, sep, values = text.rpartition(":")
    try:
        weights = [float(v) for v in values.split(",")]
    except ValueError:
        weights = []
    if any(weight_problem(w) for w in weights):  # "nan", "inf" and 1e308 parse as floats, and poison a model
        weights = []
    if not sep or not name.strip() or not weights:
        raise AdapterSpecError(
            f"Malformed --sweep {text!r} (weights are finite numbers within ±{MAX_WEIGHT:g}).\n"
            "Grammar: NAME:W1,W2,...  e.g. style:0,0.5,1"
        )
    return name.strip(), weights
