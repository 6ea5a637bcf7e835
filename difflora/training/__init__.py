"""Stage 2, training: a TrainConfig and an image folder in, an adapter file out.

`trainer.train(config)` is the entry point: `setup` loads the base model with LoRA layers and the
optimizer, `data` prepares the data set for this run (`plan` decides its length; `check` prints the same
plan as a preflight report without training), `loop` takes the steps (`loss` is the diffusion objective),
and `outputs` writes checkpoints (`checkpoint`), sample grids (`samples`), the loss log (`log`) and, last,
the adapter file. Below `train(config)` functions take plain values, never the config object.
"""
