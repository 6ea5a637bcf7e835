"""`difflora train`'s configurations from a TOML file, its folders and its flags: one TrainConfig per adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from difflora.config import build_config, read_toml
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError

# Fields that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "save_every",
        "keep_checkpoints",
        "sample_every",
        "sample_prompts",
        "sample_seeds",
        "sample_steps",
        "sample_guidance",
        "sample_scheduler",
        "max_bad_steps",
        "grad_log_every",
        "quiet_advice",
        "num_threads",
        "compile",
        "cache_dir",
        "max_steps",
        "epochs",
        "validate_every",
        "keep_best",
        "ema_on_cpu",
    }
)


def load_train_configs(
    toml_path: Path | None, flags: Mapping[str, Any], data_dirs: Sequence[str]
) -> list[TrainConfig]:
    """One TrainConfig per adapter to train: one per folder in `data_dirs`, or one per [[adapter]] table of
    the TOML file (each table's keys over the file's [train] settings); flags given on the command line
    apply to every adapter. Each adapter is named after its folder unless its table names it."""
    data = read_toml(toml_path) if toml_path is not None else {}
    tables = data.get("adapter", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{toml_path}: 'adapter' must be [[adapter]] tables, one per adapter to train.")
    shared = (
        data.get("train")
        if isinstance(data.get("train"), dict)
        else {k: v for k, v in data.items() if k != "adapter"}
    )
    source = str(toml_path)
    several = len(data_dirs) > 1 or len(tables) > 1
    if tables and data_dirs:
        raise ConfigError("Give the folders either on the command line or as [[adapter]] tables, not both.")
    if several and flags.get("name"):
        raise ConfigError("--name names one adapter; with several folders each is named after its folder.")
    entries = [{**shared, **table} for table in tables] or [{**shared, "data_dir": d} for d in data_dirs]
    return [build_config(TrainConfig, entry, flags, source=source) for entry in entries or [shared]]
