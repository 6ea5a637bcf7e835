"""Per-block weights: `--adapters style:0.8@out=1,mid=0.5,in=0` scales each block's ΔW before the sum.

After `@`, comma-separated items, each `SELECTOR=FACTOR`, or one vector of A1111's LoRA Block Weight extension
(hako-mikan/sd-webui-lora-block-weight: 17 or 26 values for SD 1.x, 12 or 20 for SDXL, 61 for Flux, in its
BLOCKID orders below), or one of its presets by name (`@OUTALL`, its lbwpresets.txt rows). Selectors, case-insensitive:
- a block: `BASE` (the text encoders), `IN00`..`IN11`, `MID` (or A1111's `M00`), `OUT00`..`OUT11` (a UNet's SGM
  input/middle/output blocks), or a DiT family's block kind and index (`double3`, `single12`; the kinds are the
  family's `block_lists`), its `edge_blocks` (Flux: `in`, the embedders; `out`, the final layer) and its
  `text_encoder_blocks` (Flux: `clip`, `t5`; `base` weights them where they are not named);
- a group: `in`, `mid`, `out`, `base`, or a kind with an optional range (`double`, `single0-9`).
The most specific selector naming a block wins (a block over a range over a group); a block no selector names
keeps factor 1, and so do a UNet's modules outside its blocks (time embedding, final norm and conv). A module
gets its block's factor by its name, so a LoRA lacking some blocks keeps the factors of those it has. A
selector naming no block of the model (`otu=0`, SDXL's `IN09`) is refused where the model is known
(`BlockWeights.check`): a typo must not leave its blocks silently at 1.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

from difflora.config.limits import weight_problem
from difflora.errors import AdapterSpecError

_IN, _OUT = [f"IN{i:02d}" for i in range(12)], [f"OUT{i:02d}" for i in range(12)]
# The extension's BLOCKID12/17/20/26 (its "M00" is difflora's MID).
VECTOR_BLOCKS: dict[int, tuple[str, ...]] = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_OUT[3:]),
    26: ("BASE", *_IN, "MID", *_OUT),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_OUT[:6]),
    20: ("BASE", *_IN[:9], "MID", *_OUT[:9]),
    # BLOCKIDFLUX: CLIP, T5, IN (the embedders), D00-D18, S00-S37, OUT (the final layer); D/S are the Flux
    # family's `block_lists` kinds (tests/test_block_weights_flux.py ties the two).
    61: ("CLIP", "T5", "IN", *(f"DOUBLE{i}" for i in range(19)), *(f"SINGLE{i}" for i in range(38)), "OUT"),
}
# The extension's lbwpresets.txt rows for whole groups (17 values each), as published: BASE (the text
# encoder) stays at 1 in every preset but NONE, INS and INALL included.
PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}
_GROUPS = {"in": "IN", "out": "OUT", "mid": "MID", "base": "BASE", "clip": "CLIP", "t5": "T5"}
_TEXT = ("CLIP", "T5")  # text-encoder blocks of a vector: `base` weights them where nothing names them
_GROUP_NAMES = {kind: group for group, kind in _GROUPS.items()}
_SELECTOR = re.compile(r"^([a-z_]+?)(\d+)?(?:-(\d+))?$")
BLOCK_GRAMMAR = "@SELECTOR=FACTOR,... (in, mid, out, base, IN04, OUT03, double0-9, ...), @V1,...,V17 (12/17/20/26/61) or @PRESET"


class Rule(NamedTuple):
    """One selector's factor: blocks of `kind` ("IN", "DOUBLE") with index in first..last (None: the whole
    kind); `selector` is the text as written, "" for an entry of a vector or preset."""

    kind: str
    first: int | None
    last: int | None
    factor: float
    selector: str = ""


@dataclass(frozen=True)
class BlockWeights:
    """Parsed `@...` text: its rules, in the order written."""

    text: str
    rules: tuple[Rule, ...]

    def factor(self, block: str) -> float:
        """The factor of `block` ("IN04", "MID", "BASE", "DOUBLE3", ...; "" for outside every block)."""
        parts = _split(block)
        if parts is None:
            return 1.0
        kind, index, _ = parts
        best: tuple[int, float] | None = None
        for rule_kind, first, last, value, _ in self.rules:
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
        if best is None and kind in _TEXT:
            return self.factor("BASE")
        return best[1] if best else 1.0

    def check(self, blocks: Collection[str], model: str) -> None:
        """Refuse a selector naming none of `blocks` (a model's blocks, "BASE" included), or a vector one
        of whose block kinds the model lacks, in one line naming it and the model's valid selectors: a typo
        (`otu=0`) or a block the family lacks would otherwise keep factor 1 silently. A vector may name blocks
        a smaller UNet lacks (IN09 on a tiny UNet): it is the extension's fixed layout, and each module takes its
        own block's value."""
        named = [rule for rule in self.rules if rule.selector]
        bad = next((rule.selector for rule in named if not _names_any(rule, blocks)), None)
        kinds = {rule.kind for rule in self.rules if not rule.selector} - {"BASE", *_TEXT}
        if bad is None and not all(_names_any(Rule(kind, None, None, 1.0), blocks) for kind in kinds):
            bad = f"@{self.text}"  # a vector for another architecture (SD's 17 on Flux, Flux's 61 on a UNet)
        if bad is not None:
            raise AdapterSpecError(
                f"Block selector {bad!r} names no block of this {model} model; its selectors: "
                f"{valid_selectors(blocks)}."
            )


def _split(block: str) -> tuple[str, int | None, str] | None:
    """ "IN04" -> ("IN", 4, "04"), "DOUBLE3" -> ("DOUBLE", 3, "3"), "MID"/"T5" -> (it, None, ""); None for ""."""
    if block in _GROUP_NAMES:
        return block, None, ""
    match = re.match(r"^([A-Z]+?)(\d+)?$", block)
    if match is None:
        return None
    return match[1], int(match[2]) if match[2] else None, match[2] or ""


def _names_any(rule: Rule, blocks: Collection[str]) -> bool:
    for block in blocks:
        parts = _split(block)
        if parts is None or parts[0] != rule.kind:
            continue
        if rule.first is None or (parts[1] is not None and rule.first <= parts[1] <= rule.last):  # type: ignore[operator]
            return True
    return False


def valid_selectors(blocks: Collection[str]) -> str:
    """The selectors a model's `blocks` admit, e.g. "base, in, mid, out, IN00-08, OUT00-08"."""
    kinds: dict[str, list[tuple[int, str]]] = {}
    for block in blocks:
        parts = _split(block)
        if parts is not None:
            indexed = kinds.setdefault(parts[0], [])
            indexed += [(parts[1], parts[2])] if parts[1] is not None else []
    groups = [_GROUP_NAMES.get(kind, kind.lower()) for kind in sorted(kinds)]
    spans = [
        f"{kind}{min(indexed)[1]}-{max(indexed)[1]}" for kind, indexed in sorted(kinds.items()) if indexed
    ]
    return ", ".join(groups + spans)


def parse_blocks(text: str) -> BlockWeights:
    """The rules of `text` (what follows `@`); AdapterSpecError showing the grammar for anything else."""
    body = PRESETS.get(text.strip().upper(), text.strip())
    items = [item.strip() for item in body.split(",")]
    if all(_is_number(item) for item in items):
        names = VECTOR_BLOCKS.get(len(items))
        if names is None:
            raise _error(text, f"{len(items)} values; a block vector has 12, 17, 20, 26 or 61")
        rules = tuple(
            Rule(*_block_rule(name), _factor(value, text)) for name, value in zip(names, items, strict=True)
        )
        return BlockWeights(text.strip(), rules)
    rules = []
    for item in items:
        selector, sep, value = item.partition("=")
        if not sep:
            raise _error(text, f"{item!r} is not SELECTOR=FACTOR")
        rules.append(Rule(*_selector(selector.strip(), text), _factor(value, text), selector.strip()))
    return BlockWeights(text.strip(), tuple(rules))


def _block_rule(name: str) -> tuple[str, int | None, int | None]:
    parts = _split(name)
    assert parts is not None  # the tables above hold block names only
    return parts[0], parts[1], parts[1]


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
    problem = weight_problem(value)
    if problem:
        raise _error(whole, f"factor {text.strip()!r} {problem}")
    return value


def _error(text: str, why: str) -> AdapterSpecError:
    return AdapterSpecError(
        f"Malformed block weights {text!r}: {why}.\nGrammar: NAME[:WEIGHT]{BLOCK_GRAMMAR}"
    )
