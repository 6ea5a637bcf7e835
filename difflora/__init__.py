"""difflora: LoRA adapters for Stable Diffusion models, trained, composed and exported.

The data flow, one module per stage:

    image folder --data.scan_folder (images, captions)--> [Example]
          --buckets / batches--> bucketed batches --cache--> cached latents (+ text embeddings)
          --trainer.train (train_setup, train_data, loss, checkpoint, train_log, train_samples)-->
          adapter.safetensors (adapter.save_adapter; lora.py wires peft)
          --compose.compose (spec, compat, report)--> pipeline.render / generate.generate --> PNG + parameters
    adapters --merge.merge_adapters--> one adapter (exact rank concatenation or SVD)
    adapter.safetensors --formats.kohya (export.export_adapter)--> ComfyUI / A1111 / Forge file
    foreign LoRA file   --formats.read_foreign--> Adapter (composable like our own)

Around it: config/ (one dataclass per job, TOML + flags), models.py (--model and base identity),
check.py + plan.py (`difflora check`), describe.py (`difflora inspect`), cli/ (one module per command),
embedded/ (the shipped tiny model, its drawing code and signature measures).
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
