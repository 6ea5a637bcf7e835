"""The README of difflora/embedded/flux, written from its build report by scripts/build_tiny_flux.py ship."""

from __future__ import annotations

NOT_MET = (
    "The targets are not both met in this CPU budget. Next: more steps (the loss was still falling), a GPU "
    "run (minutes for what took an hour here), or width 128."
)


def readme(r: dict) -> str:
    p, a = r["params"], r["accuracy"]
    met = a["colour_accuracy"] >= 0.8 and a["shape_accuracy"] >= 0.6
    verdict = "Both targets are met." if met else NOT_MET
    return f"""# Tiny Flux-architecture model (difflora's embedded Flux)

A complete diffusers `FluxPipeline` folder (fp16 on disk, float32 on load) pretrained from scratch on the
embedded SD model's shape world (`difflora/embedded/shapes.py`: "a red circle on a white background",
6 colours x 3 shapes x 3 backgrounds). Built by `scripts/build_tiny_flux.py`; every number below is
in `report.json`.

    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained("difflora/embedded/flux")
    image = pipe("a red circle on a white background", height=64, width=64, max_sequence_length=32,
                 true_cfg_scale=5.0, negative_prompt="", num_inference_steps=20).images[0]

**Call it with `max_sequence_length=32`**: that is the T5 length it was trained at (FluxPipeline's default,
512, pads with 480 tokens the model never saw, and training at 512 costs 9x per step on this CPU).
**Use true CFG** (`true_cfg_scale` > 1 with `negative_prompt=""`): the guidance embedding carries no
signal (below), and Flux's real classifier-free guidance is what makes the shapes follow the prompt.
difflora reads both, and the 64-px size, from `difflora_defaults.json` in this folder, so
`difflora generate "a red circle on a white background" --model difflora/embedded/flux` needs no further
flags (`--true-cfg`, `--max-sequence-length`, `--width/--height` override them), and `difflora train`
encodes T5 at the same 32 tokens.

## Components

| part | class | size | origin |
| --- | --- | --- | --- |
| transformer | FluxTransformer2DModel: 2 double + 2 single blocks, width 64 (2 heads x 32), RoPE axes (8, 12, 12), guidance embedding on, in_channels 16 (= 4 latent channels x 2x2 packed patch) | {p["transformer"]:,} params | trained here |
| vae | AutoencoderKL, 16x16x4 latents for 64x64 images (vae_scale_factor 4, so 8x8 = 64 image tokens); shift_factor 0 | {p["vae"]:,} params | the embedded SD model's, unchanged weights |
| text_encoder / tokenizer | CLIPTextModel (pooled output -> pooled_projections), real CLIP BPE, 32 tokens | {p["text_encoder"]:,} params | the embedded SD model's, unchanged weights |
| text_encoder_2 / tokenizer_2 | T5EncoderModel, 1 layer, d_model 64, gated-GELU; T5 Unigram tokenizer, 32 tokens | {p["text_encoder_2"]:,} params | random init, frozen (see below) |
| scheduler | FlowMatchEulerDiscreteScheduler, Flux-dev dynamic shifting (exp(mu) = 1.60 at 64 tokens) | | |

T5: no installed package carries the real T5 SentencePiece model and nothing may be downloaded, so the
tokenizer is a T5 Unigram model built from the captions (each caption word is one piece, scored by its log
frequency; letters, digits and punctuation are low-scored fallback pieces, so other words tokenize letter
by letter, never as `<unk>`). The T5 encoder is randomly initialised and frozen, as Flux freezes its text
encoders: the transformer learns to read its (distinct, fixed) outputs. LoRA on it works like on any T5.

## Training

Rectified flow: noisy = (1 - s) x0 + s e, target e - x0; s logit-normal(0, 1) shifted by the pipeline's
exp(mu); {r["images"]:,} procedurally drawn images, VAE latents and both text encoders' outputs cached once
(only the transformer runs per step); 10% empty captions (so `true_cfg_scale` with a negative prompt
works); AdamW, 100 warm-up steps, cosine decay (peak lr per phase below); EMA of the weights; batch {r["batch"]}.
The guidance input is drawn uniformly from [1, 5] per image: there is no guidance-distilled teacher, so
it is exercised (trained, LoRA-targetable) but carries no signal; `guidance_scale` changes little.

{history(r)}
- Machine: {r["machine"]}; one torch thread at `nice -n 10`, the 2 cores shared with other jobs.
- Date: {r["date"]}.
{commands(r)}

## Measured prompt following

Every colour x shape x background prompt (54) x seeds {a["seeds"]} = {a["images"]} images through
FluxPipeline at 64x64, {a["steps"]} steps, true_cfg_scale {a["true_cfg_scale"]} against "", guidance_scale
{a["guidance"]}, max_sequence_length 32,
measured with `difflora/embedded/signatures.py` (as `scripts/eval_embedded_model.py` does):
colour {100 * a["colour_accuracy"]:.1f}% and shape {100 * a["shape_accuracy"]:.1f}% (targets: colour >= 80%, shape >= 60%).
{verdict} The whole grid took {a["eval_seconds"]:.0f} s. `tests/test_embedded_flux.py` checks the config, the
parameter counts and one render (fast), and re-measures this grid (slow).

## LoRAs trained on it

{loras(r.get("loras"))}
"""


def history(r: dict) -> str:
    """One line per training phase, oldest first: a continued run lists the runs it started from."""
    phases, cur = [], r
    while cur is not None:
        phases.insert(0, cur)
        cur = cur.get("previous")
    lines = []
    for i, ph in enumerate(phases):
        how = (
            "from scratch"
            if i == 0
            else "continued from the weights above (fresh 100-step warm-up and cosine)"
        )
        lines.append(
            f"- Phase {i + 1}, {how}: **{ph['steps']:,}** steps x batch {ph['batch']} at peak lr {ph['lr']}, "
            f"{ph['train_seconds'] / 60:.0f} minutes of training ({ph.get('date', r['date'])})."
        )
        if ph.get("note"):
            lines.append(ph["note"].rstrip())
    total = sum(ph["train_seconds"] for ph in phases) / 60
    lines.append(f"- In all: {sum(ph['steps'] for ph in phases):,} steps, {total:.0f} minutes of training.")
    return "\n".join(lines)


def commands(r: dict) -> str:
    """The commands that built this folder; continued phases' commands are in the report's `commands`."""
    first = "`nice -n 10 python scripts/build_tiny_flux.py train --out /tmp/flux --minutes 60 --lr 6e-4`"
    lines = [f"- Command: {first}" + (" (phase 1)" if r.get("previous") else "")]
    lines += [f"  then `{step['command']}` ({step['what']})" for step in r.get("commands", [])]
    lines.append(
        "  then `python scripts/build_tiny_flux.py ship --model CHECKPOINT` (measures and writes this folder), "
        f"with CHECKPOINT the `{r['shipped_from']}` checkpoint of the last run (step {r['steps']:,})."
    )
    return "\n".join(lines)


def loras(entry: dict | None) -> str:
    """The LoRA learning table of tests/test_flux_learning.py, from the report's `loras` entry."""
    if entry is None:
        return "Not measured on this model yet: run `tests/test_flux_learning.py` (slow)."
    rows = "\n".join(
        f"| {c} | {v['prompt']} | {v['signature']} | {v['base']:.3f} | {v['lora']:.3f} "
        f"(seeds: {', '.join(f'{x:.2f}' for x in v['lora_seeds'])}) | {v['threshold']}: "
        f"{'passed' if v['passed'] else 'not reached'} |"
        for c, v in entry["concepts"].items()
    )
    return f"""Measured by `tests/test_flux_learning.py` (slow; {entry["machine"]}, {entry["date"]}):
{entry["settings"]}, rendered at this folder's defaults, seeds {entry["seeds"]}, {entry["render_steps"]} steps
(`{entry["command"]}`):

| concept | prompt | signature | base (mean) | with the LoRA (mean) | threshold |
| --- | --- | --- | --- | --- | --- |
{rows}

{entry.get("note", "")}"""
