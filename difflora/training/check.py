"""``difflora check ./images``: the training scan as a preflight report, without loading a model.

``check_folder(config)`` reads the model's geometry (config files only) and calls ``check_dataset``, which
plans the data set with ``plan_dataset``, the function ``train`` calls, and returns a ``CheckReport`` (plain
values; ``render()`` gives the text the CLI prints). ``report.errors`` lists what would stop training
(nothing usable, conflicting caption sources); everything else is a warning the user may accept.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from difflora.config.train import TrainConfig
from difflora.data.buckets import Bucket
from difflora.data.examples import Example, ScanResult
from difflora.data.masks import MaskScan
from difflora.data.regularisation import Regularisation
from difflora.data.validation import describe_held_out
from difflora.errors import first_n
from difflora.models.geometry import FALLBACK_RESOLUTION, model_geometry
from difflora.training.plan import DataSettings, Tokens, TrainingPlan, masks_origin, plan_dataset

LIST_LIMIT = 20  # longest list printed in full; the rest is counted


@dataclass
class CheckReport:
    scan: ScanResult
    resolution: int
    step: int
    no_upscale: bool
    histogram: dict[Bucket, int]  # usable images per bucket
    upscaled: list[tuple[Path, float]]  # (image, enlargement factor) for images trained larger than they are
    plan: TrainingPlan | None  # None when nothing is usable
    max_tokens: int | None
    tokens_estimated: bool  # True when no tokenizer was available and token counts are a lower bound
    model_note: str | None = None  # why the model's geometry fell back to defaults, if it did
    validation: str = ""  # the held-out images, described, when the settings hold some out
    masks: MaskScan | None = None  # the loss masks, when the settings use them
    masks_origin: str = ""
    regularisation: Regularisation | None = None  # --reg-dir's class images, when usable
    regularisation_problems: list[str] = field(default_factory=list)  # why --reg-dir cannot be used

    @property
    def errors(self) -> list[str]:
        return self.scan.errors + self.regularisation_problems

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        sections = [self._summary(), self._folders(), self._skipped(), self._captions(), self._images()]
        sections += [self._buckets(), self._masks(), self._regularisation(), self._duplicates(), self._tags()]
        sections.append(self._plan())
        sections.append(self._verdict())
        return "\n\n".join(section for section in sections if section)

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.scan.root))
        except ValueError:
            return str(path)

    def _summary(self) -> str:
        scan = self.scan
        line = (
            f"Dataset check: {scan.root}\n  {len(scan.examples)} usable image(s) in {len(scan.folders)} "
            f"folder(s), {len(scan.skipped)} skipped, {len(scan.ignored)} non-image file(s) ignored"
        )
        if scan.ignored:
            line += "\n  ignored: " + first_n([self._rel(p) for p in scan.ignored], LIST_LIMIT)
        return line

    def _folders(self) -> str:
        lines = ["Folders (repeats from N_name folder names)"]
        for folder in self.scan.folders:
            cls = f"class {folder.class_name!r}" if folder.class_name else "no class name"
            lines.append(
                f"  {folder.name:<28} {folder.repeats:>4} repeat(s)  {folder.image_count:>5} image(s)  {cls}"
            )
        lines += [f"  warning: {w}" for w in self.scan.warnings]
        return "\n".join(lines)

    def _skipped(self) -> str:
        if not self.scan.skipped:
            return ""
        skipped = [f"{self._rel(s.path)}: {s.reason}" for s in self.scan.skipped]
        return f"Skipped files ({len(skipped)})\n" + _listing(skipped, "  ")

    def _captions(self) -> str:
        issues = self.scan.caption_issues
        if not issues:
            return "Captions: all present and readable"
        lines = ["Caption problems"]
        titles = {
            "conflict": "ERROR: caption sources disagree",
            "missing": "missing caption",
            "empty": "empty caption",
            "too_long": f"longer than {self.max_tokens} tokens{' (estimated)' if self.tokens_estimated else ''}",
            "decoding": "not UTF-8",
            "orphan": "caption without image",
            "metadata": "metadata file",
        }
        for kind, title in titles.items():
            chosen = [i for i in issues if i.kind == kind]
            if chosen:
                lines.append(f"  {title} ({len(chosen)}):")
                lines.append(_listing([f"{self._rel(i.path)}: {i.message}" for i in chosen], "    "))
        return "\n".join(lines)

    def _images(self) -> str:
        examples = self.scan.examples
        if not examples:
            return ""
        areas = sorted(examples, key=lambda e: e.size[0] * e.size[1])
        median = areas[len(areas) // 2].size
        notes = Counter(
            note.split(" applied")[0] if "EXIF" in note else note for e in examples for note in e.notes
        )
        line = (
            f"Image sizes: smallest {_size(areas[0].size)}, median {_size(median)}, largest {_size(areas[-1].size)}"
            f"; median aspect {statistics.median(e.size[0] / e.size[1] for e in examples):.2f}"
        )
        if notes:
            line += "\n  converted on load: " + ", ".join(f"{n}× {what}" for what, n in sorted(notes.items()))
        return line

    def _buckets(self) -> str:
        if not self.histogram:
            return ""
        mode = "never upscale" if self.no_upscale else "upscale small images"
        lines = [f"Buckets (resolution {self.resolution}, step {self.step}, {mode})"]
        widest = max(self.histogram.values())
        for bucket, count in self.histogram.items():
            bar = "#" * max(1, round(30 * count / widest))
            lines.append(f"  {bucket!s:>10}  {count:>5}  {bar}")
        if self.upscaled:
            lines.append(f"  {len(self.upscaled)} image(s) will be enlarged (use --no-upscale to avoid):")
            lines.append(_listing([f"{self._rel(p)}: ×{factor:.2f}" for p, factor in self.upscaled], "    "))
        return "\n".join(lines)

    def _duplicates(self) -> str:
        groups = list(self.scan.duplicates.values())
        if not groups:
            return ""
        same = [" = ".join(self._rel(p) for p in paths) for paths in groups]
        return f"Duplicate images, same content ({len(groups)} group(s))\n" + _listing(same, "  ")

    def _tags(self) -> str:
        total: Counter = Counter()
        for counts in self.scan.tag_frequency.values():
            total.update(counts)
        if not total:
            return ""
        common = ", ".join(f"{tag} ({n})" for tag, n in total.most_common(15))
        return f"Most common tags ({len(total)} distinct): {common}"

    def _masks(self) -> str:
        masks = self.masks
        if masks is None:
            return ""
        lines = ["Loss masks", "  " + masks.describe(self.masks_origin)]
        missing = [
            self._rel(e.path) for e, s in zip(self.scan.examples, masks.sources, strict=True) if s is None
        ]
        for title, items in (
            ("images without a mask (they learn everywhere)", missing),
            ("masks that match no image", [str(path) for path in masks.orphans]),
            ("masks of the wrong size", masks.misshapen),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:\n" + _listing(items, "    "))
        if masks.coverage:
            low, high = min(masks.coverage), max(masks.coverage)
            lines.append(f"  coverage per mask: {100 * low:.0f}% to {100 * high:.0f}%")
        return "\n".join(lines)

    def _regularisation(self) -> str:
        """--reg-dir: the folder, its class images and their balance, and what it skipped."""
        found = self.regularisation
        if found is None:
            return ""
        scan = found.scan
        lines = [
            f"Regularisation images: {scan.root}",
            f"  {found.describe()}",
            f"  {len(scan.skipped)} skipped, {len(scan.ignored)} non-image file(s) ignored",
        ]
        problems = [f"{i.path.name}: {i.message}" for i in scan.caption_issues]
        items = [f"{s.path.name}: {s.reason}" for s in scan.skipped] + problems
        if items:
            lines.append(_listing(items, "    "))
        return "\n".join(lines)

    def _plan(self) -> str:
        if not self.plan:
            return ""
        held = f"\n  validation: {self.validation}" if self.validation else ""
        return f"Training plan\n  {self.plan.describe()}{held}"

    def _verdict(self) -> str:
        if self.ok:
            return f"OK: ready to train (dataset hash {self.scan.dataset_hash[:12]})"
        return "NOT READY:\n  " + "\n  ".join(self.errors)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _listing(lines: list[str], indent: str) -> str:
    """One indented line per item, at most LIST_LIMIT, then how many more there are."""
    return indent + first_n(lines, LIST_LIMIT, separator="\n" + indent)


def check_folder(config: TrainConfig) -> CheckReport:
    """The report `difflora check` prints for `config` (its data folder and the knobs that shape the plan):
    buckets, token limit and resolution from the model's config files and tokenizer, no weights loaded."""
    geometry = model_geometry(config.model, prediction_type=config.prediction_type)
    resolution = config.resolution or geometry.resolution or FALLBACK_RESOLUTION
    settings = DataSettings.from_config(config, resolution=resolution, bucket_step=geometry.step)
    report = check_dataset(settings, Tokens.of(geometry))
    report.model_note = geometry.note
    return report


def check_dataset(settings: DataSettings, tokens: Tokens) -> CheckReport:
    """Scan the folder exactly as training will (`plan_dataset`, the function training calls) and report
    on it. Never raises for data problems (they are in the report); raises ConfigError for invalid
    settings (e.g. a resolution that is not a multiple of the bucket step)."""
    planned = plan_dataset(settings, tokens, strict=False)
    return CheckReport(
        scan=planned.scan,
        resolution=settings.resolution,
        step=settings.bucket_step,
        no_upscale=settings.no_upscale,
        histogram=planned.histogram,
        upscaled=planned.upscaled,
        plan=planned.plan,
        max_tokens=tokens.max_tokens,
        tokens_estimated=tokens.count is None,
        validation=held_out_source(settings.validation_split, settings.validation_dir, planned.validation),
        masks=planned.masks,
        masks_origin=masks_origin(settings),
        regularisation=planned.regularisation,
        regularisation_problems=planned.regularisation_problems,
    )


def held_out_source(split: float, directory: Path | str | None, held: list[Example]) -> str:
    """The held-out images described with the option that chose them ('' when none are held out)."""
    if not held:
        return ""
    source = f"--validation-dir {directory}" if directory else f"--validation-split {split:g}"
    return describe_held_out(held, source)
