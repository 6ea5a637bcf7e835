"""The kohya LoRA format (what ComfyUI, A1111/Forge and diffusers all load): writing and reading it.

Keys: `<kohya module name>.lora_down.weight` [rank, in(, k, k)], `.lora_up.weight` [out, rank(, 1, 1)] and
`.alpha`, a 0-d float32 tensor holding the adapter's true alpha (rsLoRA already baked in, see
`difflora.adapter.inject.extract_weights`), so every consumer applies ΔW = strength · alpha/rank · up @ down. Alpha stays
float32 whatever the export dtype: all consumers read it with `.item()`, and an fp16 alpha would round
values such as 8·√8. A DoRA module also has `.dora_scale`, its axis told by its shape (`formats.dora`).
Module names come from `difflora.formats.naming` (the one table).

Metadata written (all strings, as kohya's `save_weights` does):
- the kohya minimum set: ss_v2, ss_base_model_version, ss_network_module, ss_network_dim, ss_network_alpha,
  ss_network_args; plus ss_output_name (A1111's alias), ss_sd_model_name, ss_training_comment;
- training facts, read from the adapter's `meta.extra` keys written by the trainer and, where a fact is
  absent there, from the training config TOML (`meta.config_toml`); absent facts are simply not written:

  | meta.extra key                        | config TOML key          | written as               |
  |---------------------------------------|--------------------------|--------------------------|
  | difflora.train.steps                  | max_steps                | ss_steps, ss_max_train_steps |
  | difflora.train.epochs                 | epochs                   | ss_num_epochs, ss_epoch  |
  | difflora.train.learning_rate          | learning_rate            | ss_learning_rate, ss_unet_lr |
  | difflora.train.text_encoder_lr        | text_encoder_lr          | ss_text_encoder_lr       |
  | difflora.train.seed                   | seed                     | ss_seed                  |
  | difflora.train.num_train_images       | -                        | ss_num_train_images      |
  | difflora.train.tag_frequency (JSON {dir: {tag: count}})         | - | ss_tag_frequency  |
  | difflora.train.dataset_dirs (JSON {dir: {n_repeats, img_count}}) | - | ss_dataset_dirs   |
  | difflora.train.batch_size             | batch_size               | ss_total_batch_size      |
  | difflora.train.resolution             | resolution               | ss_resolution            |
  | difflora.train.optimizer              | optimizer                | ss_optimizer             |
  | difflora.train.lr_scheduler           | lr_scheduler             | ss_lr_scheduler          |
  | difflora.train.lr_warmup_steps        | lr_warmup_steps          | ss_lr_warmup_steps       |
  | difflora.train.mixed_precision        | mixed_precision          | ss_mixed_precision       |
  | difflora.train.gradient_accumulation  | gradient_accumulation    | ss_gradient_accumulation_steps |
  | difflora.train.max_grad_norm          | max_grad_norm            | ss_max_grad_norm         |
  | difflora.train.noise_offset           | noise_offset             | ss_noise_offset          |
  | difflora.train.min_snr_gamma          | min_snr_gamma            | ss_min_snr_gamma         |
  | difflora.train.caption_dropout        | caption_dropout          | ss_caption_dropout_rate  |
  | difflora.train.lora_dropout           | lora_dropout             | ss_network_dropout       |
  | difflora.train.started_at / finished_at (unix seconds)           | - | ss_training_started_at / _finished_at |
- ModelSpec 1.0.1 (`modelspec.*`), and the `sshs_model_hash` / `sshs_legacy_hash` hashes computed as kohya's
  `precalculate_safetensors_hashes` does (over a serialisation holding only the ss_* metadata);
- every `difflora.*` key of the native file, so importing the export gives back the same adapter.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.config import parse_toml_text
from difflora.errors import AdapterCompatibilityError, AdapterFormatError, first_n
from difflora.formats import family as families
from difflora.formats.dora import KOHYA_DORA_SCALE, kohya_dora_scale, read_kohya_dora_scale
from difflora.formats.naming import READ_PREFIXES, reference_table, resolve_kohya_name, table_for_keys
from difflora.formats.native import header_metadata, meta_from_header
from difflora.formats.reference import reference_families

logger = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
NETWORK_MODULE = "networks.lora"
FOREIGN_METADATA_PREFIXES = ("ss_", "modelspec.", "sshs_")
_TRAIN_FACTS: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("steps", "max_steps", ("ss_steps", "ss_max_train_steps")),
    ("epochs", "epochs", ("ss_num_epochs", "ss_epoch")),
    ("learning_rate", "learning_rate", ("ss_learning_rate", "ss_unet_lr")),
    ("text_encoder_lr", "text_encoder_lr", ("ss_text_encoder_lr",)),
    ("seed", "seed", ("ss_seed",)),
    ("num_train_images", None, ("ss_num_train_images",)),
    ("tag_frequency", None, ("ss_tag_frequency",)),
    ("dataset_dirs", None, ("ss_dataset_dirs",)),
    ("batch_size", "batch_size", ("ss_total_batch_size",)),
    ("resolution", "resolution", ("ss_resolution",)),
    ("optimizer", "optimizer", ("ss_optimizer",)),
    ("lr_scheduler", "lr_scheduler", ("ss_lr_scheduler",)),
    ("lr_warmup_steps", "lr_warmup_steps", ("ss_lr_warmup_steps",)),
    ("mixed_precision", "mixed_precision", ("ss_mixed_precision",)),
    ("gradient_accumulation", "gradient_accumulation", ("ss_gradient_accumulation_steps",)),
    ("max_grad_norm", "max_grad_norm", ("ss_max_grad_norm",)),
    ("noise_offset", "noise_offset", ("ss_noise_offset",)),
    ("min_snr_gamma", "min_snr_gamma", ("ss_min_snr_gamma",)),
    ("caption_dropout", "caption_dropout", ("ss_caption_dropout_rate",)),
    ("lora_dropout", "lora_dropout", ("ss_network_dropout",)),
    ("started_at", None, ("ss_training_started_at",)),
    ("finished_at", None, ("ss_training_finished_at",)),
)


# ----------------------------------------------------------------------------------------------- writing


def to_kohya(
    adapter: Adapter, *, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors under kohya names, and the file's metadata (hashes included)."""
    family = families.export_family(adapter)
    table = table_for_keys(family, adapter.modules)
    outside = sorted(set(adapter.modules) - set(table.to_kohya))
    if outside:
        raise AdapterCompatibilityError(
            f"{len(outside)} module(s) of this adapter do not exist in the {family} architecture: "
            f"{first_n(outside, 3)}. The adapter's base family is recorded wrongly; re-train or re-save it "
            "on its base."
        )
    families.check_shapes(adapter.modules, table, family)
    tensors: dict[str, torch.Tensor] = {}
    for key, weights in adapter.modules.items():
        name = table.to_kohya[key]
        tensors[f"{name}.lora_down.weight"] = weights.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = weights.up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
        if weights.is_dora:  # float32 like alpha: its rounding would scale the whole weight
            tensors[f"{name}.{KOHYA_DORA_SCALE}"] = kohya_dora_scale(weights).to("cpu", torch.float32)
    return tensors, kohya_metadata(adapter, family, tensors)


def kohya_metadata(adapter: Adapter, family: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    ss = _minimum_metadata(adapter, family) | _training_metadata(adapter)
    ss = {key: value for key, value in ss.items() if value not in (None, "")}
    metadata = dict(ss)
    metadata.update(_modelspec(adapter, family))
    native = header_metadata(adapter)
    native.pop("lora_adapter_metadata", None)  # diffusers would read it as the config of PEFT keys
    for key, value in native.items():
        if not key.startswith(FOREIGN_METADATA_PREFIXES):
            metadata.setdefault(key, value)
    model_hash, legacy_hash = safetensors_hashes(tensors, ss)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    return metadata


def _minimum_metadata(adapter: Adapter, family: str) -> dict[str, str]:
    ranks = Counter(w.rank for w in adapter.modules.values())
    alphas = Counter(w.alpha for w in adapter.modules.values())
    dynamic = len(ranks) > 1 or len(alphas) > 1  # kohya's resize_lora writes "Dynamic" in this case
    v_prediction = adapter.meta.prediction_type in ("v_prediction", "v")
    trigger = ", ".join(adapter.meta.trigger_words)
    return {
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": families.kohya_base_version(family, v_prediction=v_prediction),
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": "Dynamic" if dynamic else str(next(iter(ranks))),
        "ss_network_alpha": "Dynamic" if dynamic else _number(next(iter(alphas))),
        "ss_network_args": json.dumps(_network_args(adapter)),
        "ss_output_name": adapter.meta.name,
        "ss_sd_model_name": adapter.meta.base_model,
        "ss_training_comment": f"trigger words: {trigger}" if trigger else "",
    }


def _network_args(adapter: Adapter) -> dict[str, str]:
    """LyCORIS's names for a DoRA network (kohya writes network args as strings)."""
    axes = adapter.dora_axes
    return {"dora_wd": "True", "wd_on_output": str(axes == ["out"])} if axes else {}


def _number(value: Any) -> str:
    return repr(float(value))  # kohya writes str(args.network_alpha), a float


def _training_metadata(adapter: Adapter) -> dict[str, str]:
    extra = adapter.meta.extra
    config = _config_values(adapter.meta.config_toml)
    result: dict[str, str] = {}
    for fact, config_key, ss_keys in _TRAIN_FACTS:
        value: Any = extra.get(f"difflora.train.{fact}")
        if value is None and config_key is not None:
            value = config.get(config_key)
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if fact in ("tag_frequency", "dataset_dirs") and isinstance(value, str):
            text = _checked_json(value, fact)
        for key in ss_keys:
            result[key] = text
    return result


def _config_values(config_toml: str) -> dict[str, Any]:
    if not config_toml.strip():
        return {}
    try:
        data = parse_toml_text(config_toml)
    except Exception as error:  # a damaged stored config must not block an export
        logger.warning("The adapter's stored training config is not valid TOML (%s); not reading it.", error)
        return {}
    train = data.get("train")
    return train if isinstance(train, dict) else data


def _checked_json(text: str, fact: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        logger.warning("difflora.train.%s is not JSON; written as given.", fact)
    return text


def _modelspec(adapter: Adapter, family: str) -> dict[str, str]:
    meta = adapter.meta
    v_prediction = meta.prediction_type in ("v_prediction", "v")
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": families.modelspec_architecture(family, v_prediction=v_prediction),
        "modelspec.implementation": families.modelspec_implementation(family),
        "modelspec.title": meta.name or "difflora adapter",
        "modelspec.resolution": families.resolution(family, _config_values(meta.config_toml)),
        "modelspec.date": meta.created_at,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.trigger_phrase": ", ".join(meta.trigger_words),
    }
    return {key: value for key, value in spec.items() if value}


def safetensors_hashes(tensors: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `precalculate_safetensors_hashes`: the file is serialised with only the ss_* metadata, then
    `sshs_model_hash` = sha256 of everything after the header (what A1111 shows as the LoRA's hash) and
    `sshs_legacy_hash` = first 8 hex digits of sha256 of the 64 KiB at offset 1 MiB."""
    payload = save_safetensors_bytes(
        tensors, metadata={k: v for k, v in ss_metadata.items() if k.startswith("ss_")}
    )
    header_length = int.from_bytes(payload[:8], "little")
    model_hash = hashlib.sha256(payload[8 + header_length :]).hexdigest()
    buffer = io.BytesIO(payload)
    buffer.seek(0x100000)
    legacy_hash = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


# ----------------------------------------------------------------------------------------------- reading

KOHYA_PREFIXES = tuple(f"{prefix}_" for prefix in READ_PREFIXES)
_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", KOHYA_DORA_SCALE)
# Tensor names of adapter kinds that are not a plain LoRA: recognised so the error can name the kind.
_OTHER_KINDS = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon-Tucker (lora_mid)",
    "oft_": "OFT",
    "diff": "full weight difference",
    "w_norm": "norm-layer weights",
    "b_norm": "norm-layer weights",
    "a1.weight": "GLoRA",
    "scale": "per-module scale",
}


def is_kohya_key(key: str) -> bool:
    return key.startswith(KOHYA_PREFIXES)


def from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str) -> Adapter:
    """An Adapter from kohya/A1111/ComfyUI-style keys (UNet names in diffusers or SGM form, with or
    without `.alpha`: missing means scale 1, as in kohya, ComfyUI and A1111). Every key is consumed or the
    file is refused with the keys named: a partial import would silently change what the LoRA does."""
    raw = {name: _module_weights(name, parts, source) for name, parts in _group(tensors, source).items()}
    hint = families.family_from_metadata(metadata)
    if hint is None and any(name.startswith(("lora_te1_", "lora_te2_")) for name in raw):
        hint = "sdxl"
    family, keys = _resolve_names(raw, hint, source)
    modules = {keys[name]: weights for name, weights in raw.items()}
    if family in reference_families():
        table = reference_table(family)
        # A module the reference tree lacks (a custom architecture named like this family) keeps its layout.
        modules = {
            key: _match_kind(w, table.modules[key].kind) if key in table.modules else w
            for key, w in modules.items()
        }
    return Adapter(modules=dict(sorted(modules.items())), meta=_meta_from_kohya(metadata, family))


def _group(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    foreign: dict[str, str] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if part not in _LORA_PARTS:
            kind = next(
                (k for prefix, k in _OTHER_KINDS.items() if part.startswith(prefix)), "unknown tensor"
            )
            foreign[key] = kind
            continue
        groups.setdefault(name, {})[part] = tensor
    if foreign:
        listing = first_n([f"{key}: {kind}" for key, kind in sorted(foreign.items())], 20, separator="\n  ")
        raise AdapterFormatError(
            f"{source}: {len(foreign)} key(s) are not LoRA tensors (lora_down/lora_up/alpha/dora_scale) and "
            f"cannot be applied as a LoRA:\n  {listing}\nNothing was loaded. Use the file in a tool "
            "that supports these adapter kinds (ComfyUI, A1111), or convert it to a plain LoRA."
        )
    return groups


def _module_weights(name: str, parts: dict[str, torch.Tensor], source: str) -> LoraWeights:
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        have = ", ".join(sorted(parts))
        raise AdapterFormatError(f"{source}: module {name} has {have} but needs both lora_down and lora_up.")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if up.ndim < 2 or up.shape[1] != down.shape[0]:
        raise AdapterFormatError(
            f"{source}: {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; the rank "
            "does not agree (lora_up and lora_down may be swapped). The file is damaged; re-export it."
        )
    rank = int(down.shape[0])
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
    if alpha == 0.0:
        logger.warning("%s: %s has alpha 0; read as alpha = rank, as kohya does.", source, name)
        alpha = float(rank)
    weights = LoraWeights(down=down, up=up, alpha=alpha)
    scale = parts.get(KOHYA_DORA_SCALE)
    return weights if scale is None else read_kohya_dora_scale(name, scale, weights, source)


def _resolve_names(raw: dict[str, LoraWeights], hint: str | None, source: str) -> tuple[str, dict[str, str]]:
    """Family and difflora key per kohya name: the first reference family whose table holds every name
    with fitting shapes; failing that, each name on its own (custom architectures)."""
    for family in families.candidates(hint):
        table = reference_table(family)
        keys = {name: table.from_kohya.get(name) for name in raw}
        if all(keys.values()) and all(families.shape_fits(raw[n], table.modules[k]) for n, k in keys.items()):  # type: ignore[index]
            return family, _unique(keys, source)  # type: ignore[arg-type]
    keys = {name: resolve_kohya_name(name, families.candidates(hint)) for name in raw}
    unknown = sorted(name for name, key in keys.items() if key is None)
    if unknown:
        listing = first_n(unknown, 20, separator="\n  ")
        raise AdapterFormatError(
            f"{source}: {len(unknown)} LoRA module name(s) match no module of SD1.x, SD2.x, SDXL or the "
            f"embedded model:\n  {listing}\nNothing was loaded. The file may be for another architecture "
            "(SD3, Flux, ...) or use a naming difflora does not read."
        )
    return (hint if hint in families.FAMILIES else "custom"), _unique(keys, source)  # type: ignore[arg-type]


def _unique(keys: dict[str, str], source: str) -> dict[str, str]:
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if key in seen:
            raise AdapterFormatError(
                f"{source}: {seen[key]} and {name} both name the module {key} (diffusers and SGM spellings "
                "of the same layer). Keep one of them."
            )
        seen[key] = name
    return keys


def _match_kind(weights: LoraWeights, kind: str) -> LoraWeights:
    """Write a 1x1-convolution LoRA the way the module needs it ([r, in] for Linear, [r, in, 1, 1] for Conv)."""
    down, up = weights.down, weights.up
    if kind == "conv" and down.ndim == 2:
        return replace(weights, down=down[:, :, None, None], up=up[:, :, None, None])
    if kind == "linear" and down.ndim == 4:
        return replace(weights, down=down.flatten(1), up=up.flatten(1))
    return weights


def _meta_from_kohya(metadata: dict[str, str], family: str) -> AdapterMeta:
    """A file difflora exported gives back its adapter's metadata exactly; any other file keeps all of its
    metadata in `extra` (for `difflora inspect`) and the facts difflora uses in the fields."""
    if "difflora.format_version" in metadata:
        meta = meta_from_header(metadata, native=True)
        meta.extra = {k: v for k, v in meta.extra.items() if not k.startswith(FOREIGN_METADATA_PREFIXES)}
        meta.source_format = "kohya"
        return meta
    version = metadata.get("ss_base_model_version", "")
    v_prediction = version.endswith("_v") or metadata.get("modelspec.prediction_type") == "v"
    trigger = metadata.get("modelspec.trigger_phrase", "")
    return AdapterMeta(
        name=metadata.get("ss_output_name", "") or metadata.get("modelspec.title", ""),
        base_model=metadata.get("ss_sd_model_name", ""),
        base_family=family,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        trigger_words=[word.strip() for word in trigger.split(",") if word.strip()],
        source_format="kohya",
        created_at=metadata.get("modelspec.date", ""),
        difflora_version="",
        extra=dict(metadata),
    )
