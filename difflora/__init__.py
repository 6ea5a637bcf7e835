"""difflora: LoRA adapters for Stable Diffusion models, trained, composed and exported.

The data flow, one package per stage (each package's docstring says what it takes in and hands on):

    image folder --data (scan, images, captions, buckets, batches, cache)--> examples, cached latents
          --training (trainer: setup -> loop -> outputs; loss, checkpoint, log, samples)--> adapter file
    adapter file --composition (find, fit, composer, report, merge)--> W = W0 + Σ wᵢ·ΔWᵢ on the model
          --generation (generate, pipeline, schedulers)--> PNG files with their parameters
    adapter file <--formats (read, native, kohya, diffusers_peft, export, consumers)--> ComfyUI / A1111 /
          Forge / diffusers files, both ways

Beside the flow: models/ (--model in, a pipeline and its identity out), adapter/ (the in-memory adapter
and its peft layers), config/ (one frozen dataclass per job, TOML + flags, and the grammars of the values
they parse once: adapter specs, sweeps, scheduler names), embedded/ (the shipped tiny model), serving/
(`difflora serve`), cli/ (one thin module per command). Imports point one way: cli -> serving, training
-> generation -> composition -> formats -> models -> adapter, data -> config -> errors (config reads
nothing above it but leaves, such as adapter/'s default LoRA target names).

The public Python API, importable from here (each name is imported on first use, so `import difflora`
and `difflora --help` do not pay for torch):

    train(TrainConfig) -> Path               difflora.training.trainer.train
    compose(pipe, [AdapterWeight]) -> Composer  difflora.composition.composer.compose
    generate(GenerateConfig) -> [Path]       difflora.generation.generate.generate
    merge(weights, output, ...)              difflora.composition.merge.merge
    export_adapter(ExportConfig) -> Path     difflora.formats.export.export_adapter
    export_spec(ExportConfig) -> Path        difflora.composition.weighted.export_spec (FILE:W@BLOCKS baked)
    load_adapter(path) / save_adapter(...)   difflora.formats.read / difflora.formats.native
    load_pipeline(model=None), render(...)   difflora.models.loading / difflora.generation.pipeline
    parse_adapter_weights("style:0.7")       difflora.config.spec
    TrainConfig, GenerateConfig, MergeConfig, ExportConfig, Adapter, AdapterMeta, LoraWeights, Composer
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from difflora.adapter.peft_import import install as defer_bitsandbytes  # a meta-path finder: cheap
from difflora.chatter import silence_known_chatter  # logging only: cheap

silence_known_chatter()
defer_bitsandbytes()

# public name -> the module that defines it
_API: dict[str, str] = {
    "train": "difflora.training.trainer",
    "compose": "difflora.composition.composer",
    "Composer": "difflora.composition.composer",
    "generate": "difflora.generation.generate",
    "render": "difflora.generation.pipeline",
    "merge": "difflora.composition.merge",
    "export_adapter": "difflora.formats.export",
    "export_spec": "difflora.composition.weighted",
    "load_adapter": "difflora.formats.read",
    "save_adapter": "difflora.formats.native",
    "load_pipeline": "difflora.models.loading",
    "parse_adapter_weights": "difflora.config.spec",
    "AdapterWeight": "difflora.config.spec",
    "Adapter": "difflora.adapter.types",
    "AdapterMeta": "difflora.adapter.types",
    "LoraWeights": "difflora.adapter.types",
    "TrainConfig": "difflora.config.train",
    "GenerateConfig": "difflora.config.generate",
    "MergeConfig": "difflora.config.merge",
    "ExportConfig": "difflora.config.export",
    "DiffloraError": "difflora.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'difflora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once; later lookups bypass __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
