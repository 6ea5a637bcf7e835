"""Stage 4, composition: saved adapters and weights in, a model whose layers are W0 + Σ wᵢ·ΔWᵢ out.

An adapter set arrives parsed (`Sequence[AdapterWeight]`, difflora.config.spec). `find` finds the files
its names refer to; `fit` checks each adapter against the model (architecture, shapes, base hash);
`composer` applies them, fused from a kept W0 or as peft's dynamic adapters (a DoRA adapter as its
effective update against W0); `report` tells how the adapters' updates overlap per layer; `merge` writes
several adapters as one file; `mixed` gives each sample of one batch its own set (hooks adding per-sample
low-rank updates, the weights untouched). Hands the composed pipeline to `difflora.generation`.
"""
