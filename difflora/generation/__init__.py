"""Stage 5, generation: a GenerateConfig in, PNG files that say how they were made out.

`generate.generate(config)` loads the model, composes the adapters (`difflora.composition`) and renders;
`pipeline` renders deterministically per seed, draws contact sheets and writes PNGs with A1111
`parameters`; `schedulers` builds the diffusers scheduler a sampler name (difflora.config.schedulers) stands for.
"""
