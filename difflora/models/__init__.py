"""The base model: `--model` in, a diffusers pipeline and its identity out.

`loading` resolves `--model` (the embedded default, a diffusers folder, a single-file checkpoint, a hub id)
and loads it offline first; `identity` fingerprints what was loaded (family, architecture, weight hash), so
adapters know which base they belong to; `geometry` reads a model's native resolution, bucket step and
tokenizer from its config files alone (what `difflora check` needs).
"""
