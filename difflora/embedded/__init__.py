"""The embedded default model: a tiny Stable Diffusion 1.x pretrained on procedurally drawn shapes.

`EMBEDDED_MODEL_DIR` is a standard diffusers folder (StableDiffusionPipeline, 64x64 images,
16x16x4 latents, 32-token CLIP text encoder) that loads offline with
`StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR)`. It draws "a <colour> <shape> on a
<background> background" for the colours, shapes and backgrounds in `shapes`; `signatures` measures
what an image shows. Built by scripts/pretrain_embedded_model.py; quality in BENCHMARKS.md.

The folder next to `model/`, `flux/`, holds the same world in the Flux architecture: a diffusers folder
that loads offline with `FluxPipeline.from_pretrained(...)`, called with height=width=64 and
max_sequence_length=32 (no constant here: family names stay in the family modules). Built by
scripts/build_tiny_flux.py; how and how well in its README.md.
"""

from pathlib import Path

EMBEDDED_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"

__all__ = ["EMBEDDED_MODEL_DIR"]
