"""ExportConfig: every knob of `difflora export`, one field each; the string under a field is its flag's help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from difflora.config import Problems

ExportFormat = Literal["comfyui", "diffusers"]
ExportDtype = Literal["fp16", "bf16", "fp32"]
EXPORT_FORMATS: tuple[str, ...] = ("comfyui", "diffusers")
EXPORT_DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class ExportConfig:
    adapter: str = ""
    """The adapter file to export (any LoRA or LyCORIS file difflora reads: its own, kohya, diffusers, PEFT), or
    FILE[:WEIGHT[:TE_WEIGHT]][@BLOCKS] (the --adapters grammar) to bake those weights into the written file."""
    output: str | None = None
    """Where to write. Default: beside the adapter, <name>.<format>.safetensors."""
    format: ExportFormat = "comfyui"
    """comfyui: kohya names (lora_unet_/lora_te_; Flux in its fused original layout), loaded by ComfyUI,
    A1111/Forge and diffusers alike.
    diffusers: difflora's native diffusers PEFT layout."""
    dtype: ExportDtype = "fp16"
    """Tensor precision of the written file (alpha is always stored exactly)."""
    overwrite: bool = False
    """Replace an existing output file."""
    model: str | None = None
    """Base model a DoRA adapter's magnitudes are converted against for --format comfyui (they depend on the
    base weights), and whose diffusers folder gives the layer sizes of a model of another size than its
    family's (a reduced Flux). Default: the base the adapter records."""

    def __post_init__(self) -> None:
        problems = Problems()
        problems.check(bool(self.adapter), "adapter", "give the adapter file to export.")
        problems.check(
            self.format in EXPORT_FORMATS,
            "format",
            f"{self.format!r} is not one of {', '.join(EXPORT_FORMATS)}.",
        )
        problems.check(
            self.dtype in EXPORT_DTYPES, "dtype", f"{self.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}."
        )
        problems.check(
            self.output is None or not str(self.output).endswith("/"),
            "output",
            "give a file name, not a folder.",
        )
        problems.raise_if_any("export")
