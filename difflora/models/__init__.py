"""The base model: `--model` in, a diffusers pipeline and its identity out.

`loading` resolves `--model` (the embedded default, a diffusers folder, a single-file checkpoint, a hub id)
and loads it offline first; `architecture` decides which supported base (SD 1.x, SD 2.x, SDXL base) a
single file or folder is, from its keys and shapes or its configs, and refuses the others by name;
`single_file` loads a checkpoint in the original layout with no network, from the config folders shipped in
`architectures/`; `identity` fingerprints what was loaded (family, architecture, weight hash), so adapters
know which base they belong to; `geometry` reads a model's native resolution, bucket step and tokenizer from
its config files alone (what `difflora check` needs). `families` declares what differs between the base
families, one class each; everything here asks the family rather than testing its name.
"""
