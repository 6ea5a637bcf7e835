"""`generate(config)`: load the model, compose the adapters, render, and write PNGs that say how they were made.

Every PNG carries A1111-style `parameters` (readable by A1111/Forge "PNG Info") and has a JSON sidecar with
the full record (model identity, adapter files and weights, composition mode). Several images get a contact
sheet; `--sweep` renders a labelled grid over adapter weights with the same seed in every cell, re-weighting
the fused model between cells (a weighted sum of precomputed updates, no reload).
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from difflora import __version__
from difflora.composition.composer import DELTA_CACHE_BYTES, Composer, Mode
from difflora.composition.find import adapter_dirs
from difflora.config.generate import GenerateConfig
from difflora.config.spec import AdapterWeight
from difflora.errors import ConfigError, Interrupted
from difflora.generation.pipeline import (
    a1111_parameters,
    generation_options,
    image_grid,
    render,
    save_png,
)

if TYPE_CHECKING:
    from difflora.generation.compare import Column

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
RENDER_SETTINGS = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance",
    "width",
    "height",
    "scheduler",
    "true_cfg",
    "max_sequence_length",
)


@dataclass
class _Job:
    """What one call renders: the settings shared by every image, plus a progress counter."""

    config: GenerateConfig
    pipe: Any
    composer: Composer
    out: Path
    total_steps: int
    progress: Progress | None
    done: int = 0
    expected: int = 0  # images (PNG + sidecar) this call renders, contact sheets and grids not counted
    written: list[Path] = field(default_factory=list)  # those complete so far, for an interruption's message


def generate(
    config: GenerateConfig, *, composer: Composer | None = None, progress: Progress | None = None
) -> list[Path]:
    """Render `config` and return the PNG paths written (images first, then the contact sheet or sweep
    grid). Without `composer`, the config's model is loaded and composed for this call alone; with one
    (a Composer on a loaded pipeline, which the caller keeps to generate again), its pipeline renders and
    keeps the config's adapters composed afterwards."""
    mode: Mode = "fused" if config.fuse else "dynamic"
    if composer is not None and composer.mode != mode:
        raise ConfigError(
            f"The composer given composes {composer.mode}, but the config asks for {mode} composition "
            "(--fuse/--no-fuse): pass a Composer of that mode."
        )
    composer = composer or _composer_for(config, mode)
    composer.directories = adapter_dirs(config.adapter_dir)  # where this config's adapters are found
    composer.set(_with_sweep_adapters(config.adapter_weights, config.sweeps))
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.report:
        _write_report(composer, out)
    columns = _compare_columns(config, composer) if config.compare else []
    cells = max(1, _grid_size(config.sweeps), len(columns) * (1 + len(config.compare_prompt)))
    job = _Job(config, composer.pipe, composer, out, config.steps * config.num_images * cells, progress)
    job.expected = config.num_images * cells
    seeds = [seed + i for i in range(config.num_images)]
    try:
        if config.sweeps:
            return [path for s in seeds for path in _sweep(job, s)]
        if columns:
            return _compare(job, seeds, columns)
        return _images(job, seeds)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(job)) from None


def _images(job: _Job, seeds: list[int]) -> list[Path]:
    """Each image rendered and written in turn (a Ctrl-C keeps those finished), then the contact sheet."""
    first = _next_index(job.out)
    images, paths = [], []
    for index, seed in enumerate(seeds):
        images.append(_render(job, [seed])[0])
        paths.append(_save_image(job, images[-1], seed, first + index))
    if len(images) > 1:
        cols = min(len(images), 4)
        sheet = image_grid(
            images, rows=-(-len(images) // cols), cols=cols, labels=[f"seed {s}" for s in seeds]
        )
        paths.append(_save(job, sheet, seeds[0], first + len(images), name="sheet", extra={"seeds": seeds}))
    return paths


def _interrupted_message(job: _Job) -> str:
    if not job.written:
        return "Interrupted before the first image was complete: no image was written."
    listed = ", ".join(str(path) for path in job.written)
    return (
        f"Interrupted: wrote {len(job.written)} of {job.expected} images before the interruption: {listed} "
        "(each with its .json sidecar). No partial file was left."
    )


def _load(config: GenerateConfig) -> Any:
    from difflora.models.dit_files import ComponentFiles
    from difflora.models.loading import load_pipeline

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = ComponentFiles(config.clip_l, config.t5, config.vae, config.clip_g, config.text_encoder)
    return load_pipeline(config.model, device=device, prediction_type=config.prediction_type, files=files)


def _composer_for(config: GenerateConfig, mode: Mode) -> Composer:
    """A composer for this call alone. Its cache of computed updates pays off only when the weights change
    between images (--sweep, --compare); for one weighting it would hold up to 2 GB for nothing (SDXL's
    attention updates in float32), beside the model and the kept W0."""
    reweights = bool(config.sweeps or config.compare)
    return Composer(_load(config), mode, delta_cache_bytes=DELTA_CACHE_BYTES if reweights else 0)


def _with_sweep_adapters(
    specs: Sequence[AdapterWeight], sweeps: Sequence[tuple[str, Sequence[float]]]
) -> list[AdapterWeight]:
    """Adapters named only by --sweep are composed too (their weight is set per cell)."""
    names = {spec.name for spec in specs}
    return [*specs, *(AdapterWeight(name, values[0]) for name, values in sweeps if name not in names)]


def _grid_size(sweeps: Sequence[tuple[str, Sequence[float]]]) -> int:
    size = 1
    for _, values in sweeps:
        size *= len(values)
    return size if sweeps else 0


def _render(job: _Job, seeds: list[int]) -> list[Image.Image]:
    config = job.config
    offset = job.done

    def report(done: int, total: int) -> None:
        if job.progress:
            job.progress(offset + done, job.total_steps)

    settings = render_settings(config)
    prompt = settings.pop("prompt")
    zero_snr = trained_with_zero_terminal_snr(job.composer)
    images = render(
        job.pipe, [prompt] * len(seeds), seeds=seeds, progress=report, zero_terminal_snr=zero_snr, **settings
    )
    job.done += config.steps * len(seeds)
    return images


def trained_with_zero_terminal_snr(composer: Composer) -> bool:
    """Whether a composed adapter was trained on the zero-terminal-SNR schedule (it then needs the
    matching sampler schedule; its header says so)."""
    return any(
        composer.adapter(spec.name).meta.extra.get("difflora.train.zero_terminal_snr") == "True"
        for spec in composer.adapters
    )


def render_settings(config: GenerateConfig) -> dict[str, Any]:
    """The config values render() is given and every PNG records (A1111 parameters and sidecar), read in
    one place so that what a PNG says can never drift from how it was rendered."""
    return {name: getattr(config, name) for name in RENDER_SETTINGS}


def image_record(
    config: GenerateConfig,
    composer: Composer,
    image: Image.Image,
    seed: int,
    *,
    adapters: Sequence[AdapterWeight] | None = None,
) -> tuple[dict[str, Any], str]:
    """What a PNG says of how it was made: the settings it was rendered with (its seed and actual size
    included), and the A1111 `parameters` text naming the model and the composed adapters (or `adapters`,
    the image's own set in a mixed batch). Built here alone, for `difflora generate` and the server, so
    that the two write the same text."""
    given = render_settings(config)
    options = generation_options(
        composer.pipe, true_cfg=config.true_cfg, max_sequence_length=config.max_sequence_length
    )
    settings = {
        **given,
        **options,  # the values rendered with, the model's defaults filled in
        "seed": seed,
        "width": config.width or image.width,
        "height": config.height or image.height,
    }
    specs = composer.adapters if adapters is None else adapters
    named = [(spec.name, spec.weight, spec.text_encoder_weight) for spec in specs]
    identity = composer.identity
    parameters = a1111_parameters(
        **settings, model=identity.name, model_hash=identity.base_hash, adapters=named
    )
    return settings, parameters


def sweep_cells(sweeps: Sequence[tuple[str, Sequence[float]]]) -> list[tuple[dict[str, float], str]]:
    """The sweep grid's cells in order, row by row (columns: the first sweep's weights, rows: the second's):
    each cell's adapter weights and its label. `difflora generate --sweep` and the web UI's sweep share it."""
    names = [name for name, _ in reversed(sweeps)]
    cells = []
    for combo in itertools.product(*[values for _, values in reversed(sweeps)]):
        cell = dict(zip(names, combo, strict=True))
        cells.append((cell, " ".join(f"{name}={cell[name]:g}" for name, _ in sweeps)))
    return cells


def _sweep(job: _Job, seed: int) -> list[Path]:
    """One image per combination of sweep weights, same seed everywhere; columns = first sweep, rows =
    second. Returns the cells' PNGs, then the labelled grid."""
    sweeps = job.config.sweeps
    base = {spec.name: spec for spec in job.composer.adapters}
    images, labels, paths = [], [], []
    first = _next_index(job.out)
    cells = sweep_cells(sweeps)
    for index, (cell, label) in enumerate(cells):
        job.composer.set_weights([AdapterWeight(name, w) for name, w in cell.items()])
        image = _render(job, [seed])[0]
        images.append(image)
        labels.append(label)
        paths.append(_save_image(job, image, seed, first + index))
    job.composer.set_weights(list(base.values()))
    cols = len(sweeps[0][1])
    grid = image_grid(images, rows=len(cells) // cols, cols=cols, labels=labels)
    sweep_record = {name: values for name, values in sweeps}
    paths.append(_save(job, grid, seed, first + len(cells), name="sweep", extra={"sweep": sweep_record}))
    return paths


def _compare_columns(config: GenerateConfig, composer: Composer) -> list[Column]:
    from difflora.generation.compare import compare_columns

    return compare_columns(config.compare_entries, composer.directories)


def _compare(job: _Job, seeds: list[int], columns: Sequence[Column]) -> list[Path]:
    """A column per adapter or checkpoint (each composed with --adapters), a row per prompt and seed (the
    PROMPT's, then each --compare-prompt's): each cell's PNG, recording its own prompt, then the labelled
    grid."""
    from dataclasses import replace

    from difflora.generation.labels import labelled_table

    config = job.config
    prompts = [config.prompt, *config.compare_prompt]
    configs = [replace(config, prompt=prompt) for prompt in prompts]
    first = _next_index(job.out)
    rows: list[list[Image.Image]] = [[] for _ in prompts for _ in seeds]
    paths = []
    try:
        for column in columns:
            job.composer.set([*config.adapter_weights, column.spec])
            for row, (row_config, seed) in enumerate((c, s) for c in configs for s in seeds):
                job.config = row_config  # what this cell renders and its PNG records
                rows[row].append(_render(job, [seed])[0])
                paths.append(_save_image(job, rows[row][-1], seed, first + len(paths)))
    finally:
        job.config = config
    job.composer.set(list(config.adapter_weights))
    several = len(prompts) > 1  # then each row names its prompt, and the grid has no title
    labels = [f"seed {s}: {p}" if several else f"seed {s}" for p in prompts for s in seeds]
    grid = labelled_table(rows, labels, [c.label for c in columns], title="" if several else config.prompt)
    extra: dict[str, Any] = {
        "compare": [{"label": c.label, "file": c.spec.name, "weight": c.spec.weight} for c in columns]
    }
    extra |= {"prompts": prompts} if several else {}
    paths.append(_save(job, grid, seeds[0], first + len(paths), name="compare", extra=extra))
    return paths


def _save(
    job: _Job,
    image: Image.Image,
    seed: int,
    index: int,
    *,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    path = job.out / f"{index:05d}-{name or seed}.png"
    composer = job.composer
    identity = composer.identity
    settings, parameters = image_record(job.config, composer, image, seed)
    sidecar = {
        **settings,
        "model": {
            "name": identity.name,
            "architecture": identity.architecture,
            "base_hash": identity.base_hash,
        },
        "adapters": [_adapter_record(composer, spec) for spec in composer.adapters],
        "composition": composer.mode,
        "parameters": parameters,
        "difflora_version": __version__,
        **(extra or {}),
    }
    try:
        save_png(image, path, parameters=parameters, sidecar=sidecar)
    except BaseException:
        # A PNG and its sidecar are one record: interrupted between the two, drop the PNG too.
        if not path.with_suffix(".json").exists():
            path.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s", path)
    return path


def _save_image(job: _Job, image: Image.Image, seed: int, index: int) -> Path:
    path = _save(job, image, seed, index)
    job.written.append(path)
    return path


def _adapter_record(composer: Composer, spec: AdapterWeight) -> dict[str, Any]:
    path = composer.path(spec.name)
    meta = composer.adapter(spec.name).meta
    return {
        "name": spec.name,
        "weight": spec.weight,
        "te_weight": spec.text_encoder_weight,
        "file": str(path) if path else None,
        "base_hash": meta.base_hash,
        "trigger_words": meta.trigger_words,
    }


def _next_index(out: Path) -> int:
    """A1111-style numbering: one past the highest NNNNN- prefix in the folder, so nothing is overwritten."""
    numbers = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def _write_report(composer: Composer, out: Path) -> None:
    from difflora.safe_io import write_atomic

    text = composer.report().text()
    logger.info("%s", text)
    write_atomic(out / "composition-report.txt", (text + "\n").encode())
