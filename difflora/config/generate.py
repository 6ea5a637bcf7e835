"""GenerateConfig: every knob of `difflora generate`, one field each.

Flag and TOML key names map 1:1 (`--negative-prompt` <-> `negative_prompt`); the string under a field is
its help. Validation collects every problem into one ConfigError naming the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from difflora.config import Problems, coerce_to_tuples
from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.config.spec import AdapterWeight, parse_adapter_weights, parse_sweep
from difflora.errors import DiffloraError

MAX_SWEEPS = 2


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str = ""
    """The text prompt."""
    adapters: tuple[str, ...] = ()
    """Adapters to compose: NAME[:WEIGHT[:TE_WEIGHT]],... (--adapter is another name for --adapters)."""
    adapter_dir: tuple[str, ...] = ()
    """Extra folders searched for adapters by name (./adapters, where `difflora train` writes, always is)."""
    model: str | None = None
    """Base model: a diffusers folder, a .safetensors checkpoint or a hub id. Default: the embedded model."""
    clip_l: str | None = None
    """With a transformer-only Flux.1 file as --model: its CLIP-L text encoder (ComfyUI's clip_l.safetensors)."""
    t5: str | None = None
    """With a transformer-only Flux.1 file as --model: its T5-XXL encoder (e.g. t5xxl_fp16.safetensors)."""
    vae: str | None = None
    """With a transformer-only Flux.1 file as --model: its autoencoder (BFL's ae.safetensors)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the base's UNet predicts (as for `difflora train`). Default: the model's own."""
    negative_prompt: str = ""
    """What the image should not show (used with guidance > 1)."""
    steps: int = 20
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale (1 or less turns it off). Flux.1: the guidance input of the
    guidance-distilled transformer (see --true-cfg)."""
    true_cfg: float | None = None
    """Flux.1: true classifier-free guidance (above 1 every step also runs the negative prompt, "" if none).
    Default: the model's (its folder's difflora_defaults.json), else 1 (off)."""
    max_sequence_length: int | None = None
    """Flux.1: T5 tokens the prompt is padded to (1-512; a model should be used at the length it was trained
    at). Default: the model's (its folder's difflora_defaults.json), else 512 or its tokenizer's length."""
    seed: int | None = None
    """Seed of the first image (image i uses seed + i). Default: a random seed, written into each PNG."""
    num_images: int = 1
    """How many images (a contact sheet is added when more than one)."""
    width: int | None = None
    """Image width in pixels, a multiple of 8. Default: the model's native size."""
    height: int | None = None
    """Image height in pixels, a multiple of 8. Default: the model's native size."""
    scheduler: str = "euler"
    """Sampler: difflora's name for a diffusers scheduler (see difflora.config.schedulers)."""
    out: str = "outputs"
    """Folder for the PNG files, their JSON sidecars and contact sheets."""
    fuse: bool = True
    """Fuse the composed update into the weights (generation costs what the base model costs); --no-fuse
    keeps peft's per-adapter forward instead (fast switching of weights)."""
    report: bool = False
    """Print (and save beside the images) the per-layer composition report."""
    sweep: tuple[str, ...] = ()
    """NAME:V1,V2,... renders a labelled grid over that adapter's weight (repeat once for a 2-D grid)."""
    compare: tuple[str, ...] = ()
    """NAME[@step-N][:WEIGHT],... or a run/checkpoints folder: one labelled grid, a column per adapter or
    checkpoint (composed with --adapters), a row per seed (--num-images), to pick the rank and the epoch."""
    compare_prompt: tuple[str, ...] = ()
    """More prompts for --compare (repeat the flag): a row per prompt and seed, the PROMPT's rows first."""
    device: str | None = None
    """torch device. Default: cuda when available, else cpu."""

    def __post_init__(self) -> None:
        coerce_to_tuples(self, "adapters", "adapter_dir", "sweep", "compare", "compare_prompt")
        p = Problems()
        p.check(bool(self.prompt.strip()), "prompt", "give a prompt")
        for name in ("steps", "num_images"):
            p.check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        p.check(self.guidance >= 0, "guidance", f"must be 0 or more, got {self.guidance}")
        if self.true_cfg is not None:
            p.check(self.true_cfg >= 0, "true_cfg", f"must be 0 or more, got {self.true_cfg}")
        if self.max_sequence_length is not None:
            msl = self.max_sequence_length
            p.check(msl >= 1, "max_sequence_length", f"must be at least 1, got {msl}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                p.add(name, f"must be a positive multiple of 8, got {value}")
        if self.scheduler not in SCHEDULER_NAMES:
            p.add("scheduler", f"unknown {self.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        check_spec(p, "adapters", lambda: self.adapter_weights)
        check_spec(p, "sweep", lambda: self.sweeps)
        p.check(
            len(self.sweep) <= MAX_SWEEPS, "sweep", f"at most {MAX_SWEEPS} (rows and columns of the grid)"
        )
        if self.compare:  # parsed only when given: a plain generate parses its specs once (tested)
            check_spec(p, "compare", lambda: self.compare_entries)
        p.check(
            not (self.compare and self.sweep), "compare", "--compare and --sweep each make a grid: give one"
        )
        p.check(bool(self.compare) or not self.compare_prompt, "compare_prompt", "goes with --compare")
        p.check(all(t.strip() for t in self.compare_prompt), "compare_prompt", "an empty prompt was given")
        p.raise_if_any("generate")

    # Parsed once, by the validation above: every reader (generate, the server) takes these values, never
    # the text. Cached properties rather than fields, since every field of a config is a flag.
    @cached_property
    def adapter_weights(self) -> tuple[AdapterWeight, ...]:
        """--adapters as AdapterWeights, in the order given."""
        return tuple(parse_adapter_weights(self.adapters))

    @cached_property
    def sweeps(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        """((adapter name, weights), ...) from the NAME:V1,V2,... entries of --sweep."""
        return tuple((name, tuple(values)) for name, values in map(parse_sweep, self.sweep))

    @cached_property
    def compare_entries(self) -> tuple[AdapterWeight, ...]:
        """--compare's entries (NAME[@step-N], or a folder, at their weights), in the order given."""
        return tuple(parse_adapter_weights(self.compare)) if self.compare else ()


def check_spec(p: Problems, field: str, parse) -> None:
    try:
        parse()
    except DiffloraError as error:
        p.add(field, str(error))
