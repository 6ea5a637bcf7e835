"""The training form: TrainConfig's fields as the CLI offers them (difflora.config.fields, the code the
flags are generated from), less those the server decides, and a TrainConfig built back from the form's
values with the config's own checks.

The server decides where a run reads and writes: `data_dir` is the dataset picked under --data-root,
`output_dir` the first adapter folder the server serves (so a finished adapter is in its library) and
`cache_dir` its default beside it. The fields that name files (the model, its components, masks, ...)
take names under --data-root, confined like the dataset."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difflora.config import build_config
from difflora.config.fields import field_specs
from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.config.train import TrainConfig
from difflora.webui.paths import WebUIError, checked_name, confined

SERVER_FIELDS = ("data_dir", "output_dir", "cache_dir", "resume")
PATH_FIELDS = ("model", "clip_l", "t5", "vae", "clip_g", "masks", "preserve_prompts", "validation_dir")
CHOICES = {"sample_scheduler": SCHEDULER_NAMES}  # the CLI's (difflora.cli.train)


def form_schema() -> list[dict[str, Any]]:
    """One entry per form field, in TrainConfig's order: name, kind, item, optional, default, choices,
    help, and `path` (a name under --data-root)."""
    return [
        {**dataclasses.asdict(spec), "path": spec.name in PATH_FIELDS}
        for spec in field_specs(TrainConfig, skip=SERVER_FIELDS, choices=CHOICES)
    ]


def train_config(
    values: Mapping[str, Any], *, dataset: Path, output_dir: Path, root: Path, resume: bool = False
) -> TrainConfig:
    """The TrainConfig of a form: empty values dropped (the default applies), path fields confined to
    `root`, the server's fields set; unknown keys, wrong types and invalid settings are a ConfigError
    listing every problem, as the TOML file's are."""
    given = {key: value for key, value in values.items() if value not in (None, "", [])}
    decided = sorted(set(given) & set(SERVER_FIELDS))
    if decided:
        raise WebUIError(f"The server sets {', '.join(decided)}: leave them out of the form.")
    for name in PATH_FIELDS:
        if isinstance(given.get(name), str):
            given[name] = str(confined(root, given[name], what=name.replace("_", " ")))
    if given.get("name") is not None:
        checked_name(str(given["name"]), what="adapter name")
    else:
        given["name"] = checked_name(dataset.name, what="dataset folder name (give the run a name)")
    server = {"data_dir": str(dataset), "output_dir": str(output_dir), "resume": resume}
    return build_config(TrainConfig, {**given, **server}, source="the training form")
