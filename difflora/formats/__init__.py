"""Stage 3 and 6, files: every on-disk LoRA layout, read and written in one place.

`read.load_adapter` reads any LoRA file safely and decides which reader handles it: difflora's own layout
(`native`, diffusers' PEFT keys plus a `difflora.*` header), kohya / A1111 / ComfyUI (`kohya`) or diffusers /
PEFT (`diffusers_peft`); every key is consumed or the file is refused with the keys named. `export` writes
the kohya-named file ComfyUI, A1111/Forge and diffusers load, with `kohya_metadata`'s header; `naming` is the
one table between difflora's module names and kohya's, built from live module trees (`reference`: every
model family's shipped configs on the meta device; `family`: which of them a file is for). What differs
between families is declared on their classes (`difflora.models.families`), never branched on here. `consumers` says, key by key, what ComfyUI, A1111/Forge and
diffusers would load of a file, and how ComfyUI and A1111 compute a layer's weight from it; `dora` is where
each layout keeps DoRA magnitudes, `dora_export` converts them to the axis ComfyUI/A1111 apply;
`describe` is `difflora inspect`'s text.
"""
