"""difflora: LoRA adapters for Stable Diffusion models, trained, composed and exported.

The data flow, one module per stage:

    image folder --data.scan--> [Example] --cache.build--> cached latents (+ text embeddings)
          --trainer.train(loss.diffusion_loss)--> adapter.safetensors
          --compose.compose--> pipeline.generate --> images (PNG + parameters)
    adapter.safetensors --formats.kohya.to_kohya--> ComfyUI / A1111 / Forge file
    foreign LoRA file   --formats.read--> Adapter (composable like our own)
"""

__version__ = "0.1.0"
