"""The adapter itself: what a LoRA is in memory and how it sits in a model.

`types` holds `Adapter` (modules keyed by classic names, plus `AdapterMeta`) and `LoraWeights`
(ΔW = (alpha/rank)·B·A); `dora` the weight math of DoRA modules (a magnitude vector on top); `inject` puts
peft LoRA layers into a UNet or text encoder and reads them back; `names` converts between a live model's
module paths and the names written to files; `targets` lists the default modules adapted. `adaptive`
injects AdaLoRA (--adaptive-rank) and drives its rank allocation; `svd` turns its SVD-form layers into
ordinary LoRA pairs of each module's final rank. Files on disk are `difflora.formats`' business,
composition `difflora.composition`'s.
"""
