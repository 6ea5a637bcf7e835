"""difflora: LoRA adapters for Stable Diffusion models, trained, composed and exported.

The data flow, one module per stage:

    image folder --data.scan--> [Example] --cache.build--> cached latents (+ text embeddings)
          --trainer.train(loss.diffusion_loss)--> adapter.safetensors
          --compose.compose--> pipeline.generate --> images (PNG + parameters)
    adapter.safetensors --formats.kohya.to_kohya--> ComfyUI / A1111 / Forge file
    foreign LoRA file   --formats.read--> Adapter (composable like our own)
"""

__version__ = "0.1.0"
__all__ = ["__version__", "compose", "generate"]


def __getattr__(name: str):
    """`difflora.compose(pipe, "style:0.7,subject:0.3")` and `difflora.generate(GenerateConfig(...))`,
    imported on first use so that `import difflora` (and `difflora --help`) does not pay for torch."""
    if name in ("compose", "generate"):
        import importlib

        return importlib.import_module(f"difflora.{name}")
    raise AttributeError(f"module 'difflora' has no attribute {name!r}")
