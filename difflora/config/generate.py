"""GenerateConfig: every knob of `difflora generate`, one field each.

Flag and TOML key names map 1:1 (`--negative-prompt` <-> `negative_prompt`); the string under a field is
its help. Validation collects every problem into one ConfigError naming the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from difflora.config import Problems, coerce_to_tuples
from difflora.config.limits import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    out_of_range,
    shown,
)
from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.config.spec import AdapterWeight, parse_adapter_weights, parse_sweep
from difflora.errors import DiffloraError

MAX_SWEEPS = 2


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str = ""
    """The text prompt (at most 4000 characters)."""
    adapters: tuple[str, ...] = ()
    """Adapters to compose: NAME[:WEIGHT[:TE_WEIGHT]],..., weights within ±100 (--adapter is another name
    for --adapters)."""
    adapter_dir: tuple[str, ...] = ()
    """Extra folders searched for adapters by name (./adapters, where `difflora train` writes, always is)."""
    model: str | None = None
    """Base model: a diffusers folder, a .safetensors checkpoint or a hub id. Default: the embedded model."""
    clip_l: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its CLIP-L text encoder (ComfyUI's clip_l.safetensors)."""
    t5: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its T5-XXL encoder (t5xxl_fp16.safetensors)."""
    vae: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its autoencoder (BFL's ae.safetensors)."""
    clip_g: str | None = None
    """With a transformer-only SD3 / SD3.5 file as --model: its CLIP-G encoder (ComfyUI's clip_g.safetensors)."""
    text_encoder: str | None = None
    """With a Qwen-Image transformer file as --model: its Qwen2.5-VL text encoder (ComfyUI's
    qwen_2.5_vl_7b.safetensors)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the base's UNet predicts (as for `difflora train`). Default: the model's own."""
    negative_prompt: str = ""
    """What the image should not show (used with guidance > 1; at most 4000 characters)."""
    steps: int = 20
    """Denoising steps (1 to 1000)."""
    guidance: float = 5.0
    """Classifier-free guidance scale, 0 to 100 (1 or less turns it off). Flux.1: the guidance input of the
    guidance-distilled transformer (see --true-cfg)."""
    true_cfg: float | None = None
    """Flux.1: true classifier-free guidance, 0 to 100 (above 1 every step also runs the negative prompt, "" if none).
    Default: the model's (its folder's difflora_defaults.json), else 1 (off)."""
    max_sequence_length: int | None = None
    """Flux.1, SD3: T5 tokens the prompt is padded to (1-512; a model should be used at the length it was trained
    at). Default: the model's (its folder's difflora_defaults.json), else 512 (SD3: 256) or its tokenizer's."""
    seed: int | None = None
    """Seed of the first image (image i uses seed + i), 0 to 2^63-1. Default: a random seed, written into each PNG."""
    num_images: int = 1
    """How many images, 1 to 1000 (a contact sheet is added when more than one)."""
    width: int | None = None
    """Image width in pixels, a multiple of 8 from 8 to 8192. Default: the model's native size."""
    height: int | None = None
    """Image height in pixels, a multiple of 8 from 8 to 8192. Default: the model's native size."""
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
        check_ranges(p, self)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                p.add(name, f"must be a positive multiple of 8, got {shown(value)}")
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


# field -> (lowest, highest): every number a request carries is finite and in range (config.limits)
RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, MAX_STEPS),
    "num_images": (1, MAX_IMAGES),
    "guidance": (0, MAX_GUIDANCE),
    "true_cfg": (0, MAX_GUIDANCE),
    "max_sequence_length": (1, 512),  # T5's longest
    "seed": (0, MAX_SEED),
    "width": (8, MAX_SIZE),
    "height": (8, MAX_SIZE),
}
TEXTS = ("prompt", "negative_prompt")  # and each --compare-prompt: at most MAX_PROMPT_CHARS characters


def check_ranges(p: Problems, config: GenerateConfig) -> None:
    """RANGES and the prompts' length (a 5 MB prompt took 11.6 s to tokenise, to be cut at 77 tokens)."""
    for name, (low, high) in RANGES.items():
        value = getattr(config, name)
        problem = out_of_range(value, low, high) if value is not None else None
        if problem:
            p.add(name, problem)
    texts = [(name, getattr(config, name)) for name in TEXTS]
    for name, text in [*texts, *(("compare_prompt", t) for t in config.compare_prompt)]:
        p.check(
            len(text) <= MAX_PROMPT_CHARS,
            name,
            f"{len(text)} characters; at most {MAX_PROMPT_CHARS} (text encoders read 77 or 512 tokens)",
        )


def check_spec(p: Problems, field: str, parse) -> None:
    try:
        parse()
    except DiffloraError as error:
        p.add(field, str(error))
