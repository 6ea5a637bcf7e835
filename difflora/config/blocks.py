"""Per-block weights: `--adapters style:0.8@out=1,mid=0.5,in=0` scales each block's ΔW before the sum.

After `@`, comma-separated items, each `SELECTOR=FACTOR`, or one vector of A1111's LoRA Block Weight extension
(hako-mikan/sd-webui-lora-block-weight: 17 or 26 values for SD 1.x, 12 or 20 for SDXL, in its BLOCKID orders
below), or one of its presets by name (`@OUTALL`, its lbwpresets.txt rows). Selectors, case-insensitive:
- a block: `BASE` (the text encoders), `IN00`..`IN11`, `MID` (or A1111's `M00`), `OUT00`..`OUT11` (a UNet's SGM
  input/middle/output blocks), or a DiT family's block kind and index (`double3`, `single12`; the kinds are the
  family's `block_lists`);
- a group: `in`, `mid`, `out`, `base`, or a kind with an optional range (`double`, `single0-9`).
The most specific selector naming a block wins (a block over a range over a group); a block no selector names
keeps factor 1, and so do a UNet's modules outside its blocks (time embedding, final norm and conv). A module
gets its block's factor by its name, so a LoRA lacking some blocks keeps the factors of those it has.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from difflora.errors import AdapterSpecError

_IN, _OUT = [f"IN{i:02d}" for i in range(12)], [f"OUT{i:02d}" for i in range(12)]
# The extension's BLOCKID12/17/20/26 (its "M00" is difflora's MID).
VECTOR_BLOCKS: dict[int, tuple[str, ...]] = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_OUT[3:]),
    26: ("BASE", *_IN, "MID", *_OUT),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_OUT[:6]),
    20: ("BASE", *_IN[:9], "MID", *_OUT[:9]),
}
# The extension's lbwpresets.txt rows for whole groups (17 values each).
PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "0,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "0,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}
_GROUPS = {"in": "IN", "out": "OUT", "mid": "MID", "base": "BASE"}
_SELECTOR = re.compile(r"^([a-z_]+?)(\d+)?(?:-(\d+))?$")
BLOCK_GRAMMAR = (
    "@SELECTOR=FACTOR,... (in, mid, out, base, IN04, OUT03, double0-9, ...), @V1,...,V17 or @PRESET"
)


@dataclass(frozen=True)
class BlockWeights:
    """Parsed `@...` text: (kind, first, last, factor) rules; `first`/`last` None for a whole kind."""

    text: str
    rules: tuple[tuple[str, int | None, int | None, float], ...]

    def factor(self, block: str) -> float:
        """The factor of `block` ("IN04", "MID", "BASE", "DOUBLE3", ...; "" for outside every block)."""
        match = re.match(r"^([A-Z]+?)(\d+)?$", block)
        if not match:
            return 1.0
        kind, index = match[1], int(match[2]) if match[2] else None
        best: tuple[int, float] | None = None
        for rule_kind, first, last, value in self.rules:
            if rule_kind != kind:
                continue
            if first is None:
                rank = 0
            elif index is not None and first <= index <= last:  # type: ignore[operator]
                rank = 2 if first == last else 1
            else:
                continue
            if best is None or rank >= best[0]:
                best = (rank, value)
        return best[1] if best else 1.0


def parse_blocks(text: str) -> BlockWeights:
    """The rules of `text` (what follows `@`); AdapterSpecError showing the grammar for anything else."""
    body = PRESETS.get(text.strip().upper(), text.strip())
    items = [item.strip() for item in body.split(",")]
    if all(_is_number(item) for item in items):
        names = VECTOR_BLOCKS.get(len(items))
        if names is None:
            raise _error(text, f"{len(items)} values; a block vector has 12, 17, 20 or 26")
        rules = tuple(
            (*_block_rule(name), _factor(value, text)) for name, value in zip(names, items, strict=True)
        )
        return BlockWeights(text.strip(), rules)
    rules = []
    for item in items:
        selector, sep, value = item.partition("=")
        if not sep:
            raise _error(text, f"{item!r} is not SELECTOR=FACTOR")
        rules.append((*_selector(selector.strip(), text), _factor(value, text)))
    return BlockWeights(text.strip(), tuple(rules))


def _block_rule(name: str) -> tuple[str, int | None, int | None]:
    match = re.match(r"^([A-Z]+)(\d+)?$", name)
    assert match is not None  # the tables above hold block names only
    index = int(match[2]) if match[2] else None
    return match[1], index, index


def _selector(text: str, whole: str) -> tuple[str, int | None, int | None]:
    lowered = text.lower()
    if lowered in _GROUPS:
        return _GROUPS[lowered], None, None
    lowered = "mid" if lowered == "m00" else lowered
    match = _SELECTOR.match(lowered)
    if not match:
        raise _error(whole, f"{text!r} names no block")
    kind = _GROUPS.get(match[1], match[1]).upper()
    first = int(match[2]) if match[2] else None
    last = int(match[3]) if match[3] else first
    if first is not None and last is not None and last < first:
        raise _error(whole, f"{text!r} is an empty range")
    return kind, first, last


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _factor(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(whole, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise _error(whole, f"{text!r} is not finite")
    return value


def _error(text: str, why: str) -> AdapterSpecError:
    return AdapterSpecError(
        f"Malformed block weights {text!r}: {why}.\nGrammar: NAME[:WEIGHT]{BLOCK_GRAMMAR}"
    )
