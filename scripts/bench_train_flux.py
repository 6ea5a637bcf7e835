"""Flux training speed and memory: difflora's trainer side by side with diffusers' Flux LoRA loop.

The reference is a faithful re-implementation of the training loop of diffusers'
`examples/dreambooth/train_dreambooth_lora_flux.py` (diffusers main, 2026-08) with a caption per image (its
`--caption_column` path, the one that trains what difflora trains: one caption per image), every other
option at the script's default:

- `transformer.add_adapter(LoraConfig(r, lora_alpha=r, lora_dropout 0, init_lora_weights="gaussian"))` on
  its default targets: `attn.to_k/q/v`, `attn.to_out.0`, `attn.add_k/q/v_proj`, `attn.to_add_out`,
  `ff.net.0.proj`, `ff.net.2`, `ff_context.net.0.proj`, `ff_context.net.2` (the `attn.to_*` of the single
  blocks included); no text-encoder LoRA; everything float32 (`--mixed_precision no`).
- `torch.optim.AdamW(lora params, lr 1e-4, betas (0.9, 0.999), weight_decay 1e-4, eps 1e-8)`, constant
  schedule, gradient norm clipped to 1.
- Data: every image resized (shorter side, bilinear), randomly cropped, ToTensor and Normalize(0.5, 0.5)
  once when the dataset is built (the script keeps the tensors); a shuffling DataLoader.
- Every step: the captions text-encoded under no_grad (CLIP's pooled output and T5's last hidden state: with
  custom captions the script caches no embeddings and keeps both encoders), the pixels VAE-encoded
  (`--cache_latents` is off by default), `(latents - shift_factor) * scaling_factor`, weighting scheme
  "none": `u ~ U(0, 1)`, `timesteps = scheduler.timesteps[(u * 1000).long()]`, σ looked up from the
  scheduler, `noisy = (1 - σ) x0 + σ ε`, `FluxPipeline._pack_latents`, position ids from
  `_prepare_latent_image_ids`, text ids zeros, guidance 3.5 (its `--guidance_scale`), the transformer at
  `timestep / 1000`, `_unpack_latents`, loss `mean((pred - (ε - x0))²)` with weighting 1.
- At the end `FluxPipeline.save_lora_weights` of the peft state dict.

Two lengths differ from the script's literals because the tiny model has other sizes: CLIP is tokenized to
the tokenizer's `model_max_length` (the script writes 77, CLIP-L's length) and T5 to `tokenizer_2`'s (the
script's `--max_sequence_length` 512; the tiny Flux was trained at 32). difflora runs with the same targets,
rank, batch, resolution, steps, threads, `--timestep-sampling uniform`, guidance 3.5, AdamW with the same
weight decay and learning rate, constant schedule, no sample grids or checkpoints.

The harness (child processes, alternation, fastest run per side, the report) is scripts/bench_train.py's.

    python scripts/bench_train_flux.py [DATA_DIR] [--model difflora/embedded/flux] [--steps 60]
        [--batch-size 4] [--resolution 64] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import REPO, _peak_memory, _Phases, common_parser, compare, run_difflora

# The script's default `target_modules`; difflora takes the same modules by their last names.
REFERENCE_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 1e-4
_PHASES = ("data", "text_encode", "vae_encode", "transformer_forward", "backward", "optimizer")


def run_difflora_flux(args: argparse.Namespace, began: float) -> dict:
    """difflora's trainer at the reference's settings (see the module docstring)."""
    targets = tuple(t.removeprefix("attn.") for t in REFERENCE_TARGETS)
    return run_difflora(
        args,
        began,
        targets,
        timestep_sampling="uniform",
        guidance=args.guidance,
        optimizer="adamw",
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
    )


def _dataset(data_dir: Path, resolution: int):
    """The script's DreamBoothDataset with a caption per image: pixels prepared once, captions kept."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    files = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    pixels, captions = [], [p.with_suffix(".txt").read_text().strip() for p in files]
    for path in files:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        top = int(torch.randint(0, size[1] - resolution + 1, ()))  # RandomCrop (center_crop is off)
        left = int(torch.randint(0, size[0] - resolution + 1, ()))
        image = image.crop((left, top, left + resolution, top + resolution))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixels.append((array - 0.5) / 0.5)

    class Captioned(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, index: int) -> dict:
            return {"instance_images": pixels[index], "instance_prompt": captions[index]}

    return Captioned()


def _collate(examples: list[dict]) -> dict:
    import torch

    pixels = torch.stack([e["instance_images"] for e in examples])
    return {"pixel_values": pixels.to(memory_format=torch.contiguous_format).float(),
            "prompts": [e["instance_prompt"] for e in examples]}  # fmt: skip


def _encode_prompt(pipe, prompts: list[str], device):
    """The script's `encode_prompt` under no_grad: CLIP's pooled output, T5's last hidden state, zero ids."""
    import torch

    with torch.no_grad():
        clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        pooled = pipe.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=pipe.tokenizer_2.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        hidden = pipe.text_encoder_2(t5_ids.to(device))[0]
        text_ids = torch.zeros(hidden.shape[1], 3).to(device=device, dtype=hidden.dtype)
    return hidden, pooled, text_ids


def run_flux_reference(args: argparse.Namespace, began: float) -> dict:
    import torch
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from difflora.models.loading import load_pipeline

    imported = time.perf_counter()
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=torch.float32)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                       init_lora_weights="gaussian", target_modules=list(REFERENCE_TARGETS)))  # fmt: skip
    lora = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8
    )
    loader = torch.utils.data.DataLoader(_dataset(Path(args.data), args.resolution), batch_size=args.batch_size,
                                         shuffle=True, collate_fn=_collate, num_workers=0)  # fmt: skip
    schedule = get_scheduler(
        "constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps
    )
    transformer, optimizer, loader, schedule = accelerator.prepare(transformer, optimizer, loader, schedule)
    loaded = time.perf_counter()
    seconds, phases = _reference_loop(
        args, accelerator, pipe, transformer, scheduler, optimizer, loader, schedule
    )
    trained = time.perf_counter()
    _save(accelerator.unwrap_model(transformer), Path(args.workdir) / "reference.safetensors")
    fixed = {"start_and_imports": imported - began, "load": loaded - imported}
    fixed["final_save"] = time.perf_counter() - trained
    return {
        "step_seconds": seconds,
        "end_to_end_s": time.perf_counter() - began,
        "fixed_seconds": fixed,
        "phase_seconds_per_step": phases,
        "lora_parameters": sum(p.numel() for p in lora),
        **_peak_memory(),
    }


def _save(transformer, path: Path) -> None:
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    FluxPipeline.save_lora_weights(save_directory=str(path.parent), weight_name=path.name,
                                   transformer_lora_layers=get_peft_model_state_dict(transformer))  # fmt: skip


def _noised(scheduler, latents, device):
    """Weighting scheme "none": uniform u -> a scheduler timestep -> its σ; the flow-matching input."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=latents.shape[0],
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29)  # fmt: skip
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()].to(device)
    schedule_timesteps = scheduler.timesteps.to(device)
    indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas.to(device=device, dtype=latents.dtype)[indices].flatten()
    sigmas = sigmas.reshape(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise, noise, timesteps, sigmas


def _step(args, accelerator, pipe, transformer, scheduler, batch, clock):
    """One step's loss, as the script computes it (the phases marked on `clock`)."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    device, vae = accelerator.device, pipe.vae
    hidden, pooled, text_ids = _encode_prompt(pipe, batch["prompts"], device)
    clock.mark("text_encode")
    latents = vae.encode(batch["pixel_values"].to(dtype=vae.dtype)).latent_dist.sample()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    clock.mark("vae_encode")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size, channels, height, width = latents.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, device, latents.dtype)
    noisy, noise, timesteps, sigmas = _noised(scheduler, latents, device)
    packed = FluxPipeline._pack_latents(noisy, size, channels, height, width)
    guided = accelerator.unwrap_model(transformer).config.guidance_embeds
    guidance = torch.tensor([args.guidance], device=device).expand(size) if guided else None
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                       img_ids=image_ids, return_dict=False)[0]  # fmt: skip
    pred = FluxPipeline._unpack_latents(pred, height * factor, width * factor, factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - latents
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(size, -1), 1).mean()
    loss.detach().item()  # the script logs the loss every step
    clock.mark("transformer_forward")
    return loss


def _reference_loop(args, accelerator, pipe, transformer, scheduler, optimizer, loader, schedule):
    """Each step's wall time (its data included) and the mean seconds per steady-state step per phase."""
    seconds: list[float] = []
    phases = dict.fromkeys(_PHASES, 0.0)
    transformer.train()
    while len(seconds) < args.steps:
        began = time.perf_counter()
        clock = _Phases(dict.fromkeys(_PHASES, 0.0))
        for batch in loader:
            clock.mark("data")
            with accelerator.accumulate([transformer]):
                loss = _step(args, accelerator, pipe, transformer, scheduler, batch, clock)
                accelerator.backward(loss)
                clock.mark("backward")
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(transformer.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                clock.mark("optimizer")
            now = time.perf_counter()
            seconds.append(now - began)
            began = now
            if len(seconds) > args.warmup:
                for phase, value in clock.totals.items():
                    phases[phase] += value
            clock = _Phases(dict.fromkeys(_PHASES, 0.0))
            if len(seconds) >= args.steps:
                break
    measured = max(1, args.steps - args.warmup)
    return seconds, {phase: total / measured for phase, total in phases.items()}


def main() -> None:
    parser = common_parser(__doc__.split("\n\n")[0], REPO / "sample_data" / "style")
    parser.add_argument("--model", default=str(REPO / "difflora" / "embedded" / "flux"))
    parser.add_argument("--guidance", type=float, default=3.5, help="the script's --guidance_scale")
    parser.set_defaults(resolution=64)
    args = parser.parse_args()
    settings = ("data", "model", "steps", "batch_size", "rank", "resolution", "threads", "guidance")
    compare(args, {"difflora": run_difflora_flux, "reference": run_flux_reference}, __file__, settings)


if __name__ == "__main__":
    main()
