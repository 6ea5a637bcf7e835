"""The metadata of an exported kohya LoRA file: what A1111 lists it by, what ModelSpec readers show, and
the hashes kohya's tools compute. Module names and tensors are `difflora.formats.kohya`'s.

Metadata written (all strings, as kohya's `save_weights` does):
- the kohya minimum set: ss_v2, ss_base_model_version, ss_network_module, ss_network_dim, ss_network_alpha,
  ss_network_args; plus ss_output_name (A1111's alias), ss_sd_model_name, ss_training_comment (ss_v2 and
  ss_base_model_version, like modelspec.architecture/implementation/resolution, are the family's declared
  facts: `ModelFamily.kohya_version()`, `.modelspec()`);
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
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from difflora.adapter.types import Adapter
from difflora.config import parse_toml_text
from difflora.formats.native import header_metadata
from difflora.models.families import family as model_family

logger = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
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
        "ss_v2": str(model_family(family).kohya_v2_flag),
        "ss_base_model_version": model_family(family).kohya_version(v_prediction=v_prediction),
        "ss_network_module": model_family(family).kohya_network_module,
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
        "modelspec.architecture": model_family(family).modelspec(v_prediction=v_prediction),
        "modelspec.implementation": model_family(family).modelspec_implementation,
        "modelspec.title": meta.name or "difflora adapter",
        "modelspec.resolution": _resolution(family, _config_values(meta.config_toml)),
        "modelspec.date": meta.created_at,
        "modelspec.prediction_type": (
            ("v" if v_prediction else "epsilon") if model_family(family).modelspec_states_prediction else ""
        ),
        "modelspec.trigger_phrase": ", ".join(meta.trigger_words),
    }
    return {key: value for key, value in spec.items() if value}


def _resolution(family: str, config: Mapping[str, Any]) -> str:
    size = config.get("resolution") or model_family(family).native_resolution
    return f"{size}x{size}" if size else ""


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
