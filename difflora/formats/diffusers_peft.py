"""LoRA files in diffusers' and PEFT's layouts that are not difflora's native one.

Read here (each tensor name is `<module path><marker>` with one of these markers):
- PEFT: `.lora_A.weight` / `.lora_B.weight`, with or without a component prefix (`unet.`, `text_encoder.`,
  `text_encoder_2.`) or PEFT's `base_model.model.` wrapper (adapter_model.safetensors);
- diffusers' LoRACompatible layers: `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`;
- diffusers' old attention processors: `...attn1.processor.to_q_lora.down.weight` (and the text-encoder
  spelling `self_attn.to_q_lora`), which name the projection inside the processor;
- `.alpha` tensors beside a module (diffusers' network alphas);
- `.lora_magnitude_vector` (PEFT's and diffusers' DoRA magnitude, one per output row; `formats.dora`).
Alpha, when no tensor gives it: PEFT's `adapter_config.json` beside the file, else diffusers'
`lora_adapter_metadata` header, else scale 1 (alpha = rank), which is how diffusers and PEFT load such files.
Anything else (embedding LoRAs, unknown tensors) is refused with the keys named.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from difflora.adapter.types import COMPONENTS, Adapter, AdapterMeta, LoraWeights
from difflora.errors import AdapterFormatError, first_n
from difflora.formats import family as families
from difflora.formats.dora import PEFT_MAGNITUDE, read_peft_magnitude

logger = logging.getLogger(__name__)

_MARKERS: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # old attention processors: attn1.processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
    (f".{PEFT_MAGNITUDE}", "magnitude"),
    (f".{PEFT_MAGNITUDE}.weight", "magnitude"),  # diffusers' kohya converter's spelling
)
# Projections as the old attention processors name them -> the module they adapt.
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = (
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
)
_PEFT_WRAPPER = "base_model.model."


def read_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str) -> Adapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        parsed = split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, part = parsed
        parts.setdefault(module, {})[part] = tensor
    if unknown:
        listing = first_n(sorted(unknown), 20, separator="\n  ")
        raise AdapterFormatError(
            f"{source}: {len(unknown)} key(s) are neither LoRA A/B (down/up) matrices nor alphas in any "
            f"layout difflora reads:\n  {listing}\nNothing was loaded (LoRA on embeddings cannot be "
            "applied as a LoRA of a layer's weight)."
        )
    alphas = _alpha_source(metadata, source)
    modules = {module: _weights(module, p, alphas, source) for module, p in parts.items()}
    family = families.infer_family(modules, families.family_from_metadata(metadata))
    meta = AdapterMeta(
        base_family=family, source_format="diffusers-peft", difflora_version="", extra=dict(metadata)
    )
    meta.extra.pop("lora_adapter_metadata", None)
    return Adapter(modules=dict(sorted(modules.items())), meta=meta)


def split_key(key: str) -> tuple[str, str] | None:
    """(difflora module key, 'down' | 'up' | 'alpha') for a tensor name, or None if it is no LoRA tensor."""
    marker = next(((m, part) for m, part in _MARKERS if key.endswith(m)), None)
    if marker is None:
        return None
    path = key[: -len(marker[0])].removeprefix(_PEFT_WRAPPER)
    component, _, rest = path.partition(".")
    if component not in COMPONENTS:
        component, rest = _component_of(path), path
        if component is None:
            return None
    if marker[0] == ".alpha" and rest.endswith("_lora"):
        rest, marker = rest.removesuffix("_lora"), ("_lora.alpha", "alpha")
    if marker[0].startswith("_lora."):
        rest = _processor_projection(rest, component)
        if rest is None:
            return None
    if component.startswith("text_encoder") and rest.startswith("encoder.layers."):
        rest = "text_model." + rest  # a flattened (transformers 5) CLIP: files use the classic names
    return f"{component}.{rest}", marker[1]


def _component_of(path: str) -> str | None:
    root = path.split(".")[0]
    if root in _UNET_ROOTS:
        return "unet"
    if root in ("text_model", "encoder"):
        return "text_encoder"
    return None


def _processor_projection(path: str, component: str) -> str | None:
    """`...attn1.processor.to_q` -> `...attn1.to_q`; `...self_attn.to_q` -> `...self_attn.q_proj`."""
    head, _, projection = path.rpartition(".")
    table = _PROCESSOR_UNET if component == "unet" else _PROCESSOR_TEXT
    if projection not in table:
        return None
    return f"{head.removesuffix('.processor')}.{table[projection]}"


def _weights(module: str, parts: dict[str, torch.Tensor], alphas: Any, source: str) -> LoraWeights:
    if "down" not in parts or "up" not in parts:
        raise AdapterFormatError(
            f"{source}: {module} has {sorted(parts)} but needs both LoRA matrices (A/down and B/up)."
        )
    down, up = parts["down"], parts["up"]
    if up.ndim < 2 or up.shape[1] != down.shape[0]:
        raise AdapterFormatError(
            f"{source}: {module} has A/down {tuple(down.shape)} and B/up {tuple(up.shape)}; the rank does not agree."
        )
    rank = int(down.shape[0])
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else alphas(module, rank)
    weights = LoraWeights(down=down, up=up, alpha=alpha)
    magnitude = parts.get("magnitude")
    return weights if magnitude is None else read_peft_magnitude(module, magnitude, weights, source)


def _alpha_source(metadata: dict[str, str], source: str):
    """A function (module key, rank) -> alpha from PEFT's adapter_config.json or diffusers' header."""
    config = _adapter_config(source)
    header = json.loads(metadata.get("lora_adapter_metadata") or "{}")

    def alpha(module: str, rank: int) -> float:
        component, _, path = module.partition(".")
        short = path.removeprefix("text_model.")
        if config:
            return _peft_alpha(config, path, short, rank)
        scoped = {k.split(".", 1)[1]: v for k, v in header.items() if k.startswith(component + ".")}
        return _peft_alpha(scoped, path, short, rank) if scoped else float(rank)

    return alpha


def _adapter_config(source: str) -> dict[str, Any]:
    path = Path(source).with_name("adapter_config.json")
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        logger.warning("Ignoring %s: %s", path, error)
        return {}
    problem = peft_config_problem(config)
    if problem:
        logger.warning("Ignoring %s: it %s", path, problem)
        return {}
    return config


def peft_config_problem(config: Any) -> str | None:
    """What is wrong with a PEFT LoraConfig (adapter_config.json, or diffusers' `lora_adapter_metadata`
    header, whose keys carry a component prefix) as the alpha rules read it; None when it is sound."""
    if not isinstance(config, dict):
        return "is not a JSON object"
    for key, value in config.items():
        field = key.rsplit(".", 1)[-1]
        if field in ("r", "lora_alpha") and value is not None and not _is_number(value):
            return f"gives {key} = {value!r}, not a number"
        if field in ("alpha_pattern", "rank_pattern") and value is not None:
            if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
                return f"gives {key} that is not a table of numbers"
            unsafe = [pattern for pattern in value if _pattern_problem(pattern)]
            if unsafe:
                return f"gives {key} pattern {unsafe[0]!r}: {_pattern_problem(unsafe[0])}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Patterns are regular expressions (PEFT's rule), and a file could hang the reader with one that
# backtracks exponentially ("(a+)+x") or polynomially in many repetitions (".*.*.*.*.*x"). Real files
# write module names; so a group may not repeat, and at most 3 repetitions are evaluated.
_QUANTIFIED_GROUP = re.compile(r"\)[*+?{]")
_QUANTIFIER = re.compile(r"(?<![\\(])[*+?{]")
_MAX_QUANTIFIERS = 3


def _pattern_problem(pattern: str) -> str | None:
    if len(pattern) > 500:
        return "longer than any module name"
    if _QUANTIFIED_GROUP.search(pattern) or len(_QUANTIFIER.findall(pattern)) > _MAX_QUANTIFIERS:
        return (
            "a regular expression too costly to evaluate safely (difflora evaluates module names and "
            f"patterns with at most {_MAX_QUANTIFIERS} repetitions, none of a group)"
        )
    try:
        re.compile(pattern)
    except re.error as error:
        return f"not a valid regular expression ({error})"
    return None


def _peft_alpha(config: dict[str, Any], path: str, short: str, rank: int) -> float:
    """PEFT's rule: alpha_pattern entry matching the module (anchored regex or name suffix), else lora_alpha;
    rsLoRA scales by alpha/sqrt(rank), which is alpha·sqrt(rank) in alpha/rank terms."""
    value = config.get("lora_alpha")
    for pattern, pattern_alpha in (config.get("alpha_pattern") or {}).items():
        if any(re.fullmatch(pattern.strip("^$"), n) or n.endswith("." + pattern) for n in (path, short)):
            value = pattern_alpha
            break
    if value is None:
        return float(rank)
    return float(value) * rank**0.5 if config.get("use_rslora") else float(value)
