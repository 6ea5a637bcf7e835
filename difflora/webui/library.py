"""The library: every adapter in the adapter folders as a card, and a card's whole story.

A card holds what `difflora inspect` reports (the header's facts, rank/alpha per component from
`Adapter.summary()`, and the consumers' verdicts from `file_verdicts`, computed by the formats package and
never again here), plus the run folder `difflora train` writes beside the adapter (`<name>.run/`): its last
sample grid and loss curve. The detail adds the training configuration (the TOML the adapter carries), the
run's timing (timing.json), its plan and its loss rows. Verdicts are cached by file, size and mtime: a
library of many adapters is read once, not on every page load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from difflora.config import tomllib
from difflora.errors import DiffloraError
from difflora.webui.files import file_url

logger = logging.getLogger(__name__)

TRAIN_FACT = "difflora.train."
RUN_SUFFIX = ".run"


def run_folder(adapter_file: Path) -> Path | None:
    """The run folder `difflora train` wrote beside the adapter, when there is one."""
    folder = adapter_file.with_name(adapter_file.stem + RUN_SUFFIX)
    return folder if folder.is_dir() else None


def last_sample_grid(run: Path) -> Path | None:
    """The latest sample grid of the run (`samples/step-NNNNNN.png`; the --ema grids are not the adapter's)."""
    grids = sorted(p for p in (run / "samples").glob("step-*.png") if not p.stem.endswith("-ema"))
    return grids[-1] if grids else None


def adapter_card(name: str, path: Path, roots: dict[str, Path]) -> dict[str, Any]:
    """The card of one adapter file: its facts, verdicts, and its run's pictures (URLs under /ui/api/files)."""
    stat = path.stat()
    facts = _facts(str(path), stat.st_size, stat.st_mtime_ns)
    run = run_folder(path)
    grid = last_sample_grid(run) if run else None
    curve = run / "loss.png" if run and (run / "loss.png").is_file() else None
    return {
        "name": name,
        "file": path.name,
        "bytes": stat.st_size,
        **facts,
        "sample_grid": file_url(roots, grid) if grid else None,
        "loss_curve": file_url(roots, curve) if curve else None,
        "has_run": run is not None,
    }


@lru_cache(maxsize=1024)
def _facts(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """Everything read from the file itself (cached by path, size and mtime)."""
    from difflora.formats.family import family_of
    from difflora.formats.read import load_adapter

    adapter = load_adapter(Path(path))
    meta = adapter.meta
    family = family_of(meta.base_family)
    train = {k.removeprefix(TRAIN_FACT): v for k, v in meta.extra.items() if k.startswith(TRAIN_FACT)}
    return {
        "title": meta.name,
        "base_model": meta.base_model,
        "family": meta.base_family,
        "family_label": family.label,
        "architecture": meta.base_architecture,
        "prediction_type": meta.prediction_type,
        "source_format": meta.source_format,
        "trigger_words": list(meta.trigger_words),
        "components": adapter.summary(),
        "parameters": adapter.parameter_count,
        "created": meta.created_at,
        "difflora_version": meta.difflora_version,
        "steps": _integer(train.get("steps")),
        "images": _integer(train.get("num_train_images")),
        "train_facts": train,
        "config_toml": meta.config_toml,
        "verdicts": _verdicts(Path(path), family.name),
    }


def _verdicts(path: Path, family: str) -> list[dict[str, Any]]:
    """The consumers' verdicts as `difflora inspect` computes them; a family no consumer can be checked for
    gives one entry saying so."""
    from difflora.formats.consumers.verdicts import file_verdicts

    if path.suffix.lower() != ".safetensors":
        return []
    try:
        results = file_verdicts(path, family=family)
    except DiffloraError as error:
        return [{"consumer": "all", "complete": False, "summary": str(error), "dropped": {}}]
    return [
        {
            "consumer": v.consumer,
            "complete": v.complete,
            "summary": v.summary(),
            "loaded": v.loaded,
            "total": v.total,
            "fatal": v.fatal,
            "dropped": dict(list(v.dropped.items())[:20]),
            "notes": list(v.notes),
        }
        for v in results
    ]


def _integer(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def library(available: dict[str, Path], roots: dict[str, Path]) -> list[dict[str, Any]]:
    """Every adapter's card, by name; a file that cannot be read gets a card saying why."""
    cards = []
    for name, path in sorted(available.items()):
        try:
            cards.append(adapter_card(name, path, roots))
        except (DiffloraError, OSError, ValueError) as error:
            logger.warning("library: %s unreadable: %s", path, error)
            cards.append(
                {"name": name, "file": path.name, "error": f"{path.name} could not be read: {error}"}
            )
    return cards


def adapter_detail(name: str, path: Path, roots: dict[str, Path]) -> dict[str, Any]:
    """The card, plus the training configuration, and the run's timing, plan and loss rows."""
    card = adapter_card(name, path, roots)
    card["config"] = _parse_toml(card.get("config_toml", ""))
    run = run_folder(path)
    card["timing"] = _read_json(run / "timing.json") if run else None
    card["plan"] = _read_text(run / "plan.txt") if run else None
    card["loss"] = _loss_rows(run / "loss.csv") if run else []
    card["sample_grids"] = _all_grids(run, roots) if run else []
    return card


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text) if text.strip() else {}
    except tomllib.TOMLDecodeError:
        return {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str | None:
    return path.read_text(errors="replace") if path.is_file() else None


def _loss_rows(path: Path) -> list[dict[str, float]]:
    """(step, loss, smoothed) per logged step, as `difflora train` wrote them."""
    from difflora.training.log import read_loss_csv  # keeps whole rows only (a torn last line is dropped)

    rows = []
    for row in read_loss_csv(path):
        rows.append(
            {"step": int(row["step"]), "loss": float(row["loss"]), "smoothed": float(row["smoothed_loss"])}
        )
    return rows


def _all_grids(run: Path, roots: dict[str, Path]) -> Sequence[dict[str, Any]]:
    grids = sorted((run / "samples").glob("step-*.png"))
    return [{"name": p.stem, "url": file_url(roots, p)} for p in grids]
