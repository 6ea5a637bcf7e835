"""Training speed and memory: difflora's trainer side by side with the reference diffusers LoRA loop.

The reference is a faithful re-implementation of the training loop of diffusers'
`examples/text_to_image/train_text_to_image_lora.py` (peft version): `unet.add_adapter(LoraConfig(r, alpha=r,
init_lora_weights="gaussian", targets to_k/to_q/to_v/to_out.0))`, AdamW(betas 0.9/0.999, weight decay 1e-2,
eps 1e-8) over the LoRA parameters, a shuffling DataLoader whose transform decodes each image every time it
is drawn (Resize shorter side bilinear, CenterCrop, ToTensor, Normalize(0.5, 0.5): done here with PIL and
numpy because torchvision is not a dependency) and tokenizes the caption; every step VAE-encodes the pixels
(`latent_dist.sample() * scaling_factor`), text-encodes the tokens, adds DDPM noise at uniform timesteps,
predicts with the UNet, takes the min-SNR-γ weighted MSE (`--snr_gamma`, set to difflora's default 5 so both
compute the same loss), `accelerator.backward`, clips the gradient norm to 1, steps the optimizer and the
constant LR schedule. Nothing is cached.

Both run in their own subprocess (so peak memory is each one's own) on the same model, image folder, batch
size, resolution, LoRA rank and targets (the attention projections), number of steps and torch thread count. Reported per side: steady-state
steps/s (median step time after `--warmup` steps, times measured around each step), end-to-end seconds
(process start to adapter written: model load, difflora's one-time caching included) and peak resident
memory (ru_maxrss; on CUDA also torch's peak allocated memory). The two sides alternate `--repeats` times
and each side's fastest run is reported (all runs are listed), so a load spike on the shared machine does not
decide the ratio.

Full-size bases without a download: `--base sd15` writes (once, to `--models-dir`) a diffusers folder of the
SD 1.5 architecture with random weights, built from difflora's shipped configs, and both sides load it.
The reference also reports where its step time goes (data, VAE encode, text encode, UNet forward, backward,
optimizer), each phase timed on its own; difflora's step has only the last three (latents and text
embeddings are cached once).

    python scripts/bench_train.py [DATA_DIR] [--base embedded|sd15] [--model M] [--steps 60]
        [--batch-size 4] [--resolution PX] [--threads N] [--repeats 3]

Flux: scripts/bench_train_flux.py (diffusers' `train_dreambooth_lora_flux.py` loop) on this harness
(`common_parser`, `compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_support import random_base  # noqa: E402

REFERENCE_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def _peak_memory() -> dict[str, float]:
    import torch

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


# ------------------------------------------------------------------------------------------ difflora


def run_difflora(
    args: argparse.Namespace, began: float, targets: tuple[str, ...] = REFERENCE_TARGETS, **settings
) -> dict:
    """difflora's trainer on the reference's `targets` (difflora's SD default adds the ResNet convs);
    `settings`: further TrainConfig fields a family's reference needs (its timestep sampling, guidance)."""
    import csv

    from difflora.config.train import TrainConfig
    from difflora.training.trainer import train

    out = Path(args.workdir) / f"difflora-{os.getpid()}"  # a fresh cache each run: end to end pays it
    config = TrainConfig(
        data_dir=args.data,
        model=args.model,
        output_dir=str(out),
        name="bench",
        max_steps=args.steps,
        batch_size=args.batch_size,
        rank=args.rank,
        unet_targets=targets,
        **settings,
        resolution=args.resolution,
        # --with-outputs: difflora's default sample grids and checkpoints, as a user's run has them
        **({} if getattr(args, "with_outputs", False) else {"save_every": 0, "sample_every": 0}),
        num_threads=args.threads,
        lr_scheduler="constant",
        lr_warmup_steps=0,
    )
    imported = time.perf_counter()
    train(config, progress=False)
    with open(out / "bench.run" / "loss.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if any(row["skipped"] != "0" for row in rows):  # a skipped step does no backward: not a fair step
        raise SystemExit("difflora skipped steps (non-finite loss): the timing would not be comparable")
    phases = json.loads((out / "bench.run" / "timing.json").read_text())
    fixed = {"start_and_imports": imported - began, **{k: phases[k] for k in ("load", "threads", "caching")}}
    fixed["final_save"] = phases["final_save"] + phases["checkpoints"]
    fixed["previews"] = phases["previews"]
    return {
        "step_seconds": [float(row["seconds"]) for row in rows],
        "end_to_end_s": time.perf_counter() - began,
        "fixed_seconds": fixed,
        **_peak_memory(),
    }


# ------------------------------------------------------------------------------------------ reference


def _reference_dataset(data_dir: Path, resolution: int, tokenizer):
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in files]

    class ImageFolder(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, index: int) -> dict:
            image = Image.open(files[index]).convert(
                "RGB"
            )  # decoded on every draw, like datasets' imagefolder
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            ids = tokenizer(
                captions[index],
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
            return {"pixel_values": (pixels - 0.5) / 0.5, "input_ids": ids}

    return ImageFolder()


def run_reference(args: argparse.Namespace, began: float) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig

    from difflora.models.loading import load_pipeline

    imported = time.perf_counter()
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(accelerator.device)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=list(REFERENCE_TARGETS),
        )
    )
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
    resolution = args.resolution or int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    dataset = _reference_dataset(Path(args.data), resolution, tokenizer)
    loader = torch.utils.data.DataLoader(
        dataset,
        shuffle=True,
        batch_size=args.batch_size,
        num_workers=0,
        collate_fn=lambda items: {
            "pixel_values": torch.stack([i["pixel_values"] for i in items]).float(),
            "input_ids": torch.stack([i["input_ids"] for i in items]),
        },
    )
    lr_scheduler = get_scheduler(
        "constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    loaded = time.perf_counter()
    seconds, phases = _reference_loop(args, accelerator, unet, vae, text_encoder, noise_scheduler, optimizer,
                                      loader, lr_scheduler, lora_layers, compute_snr, F)  # fmt: skip
    trained = time.perf_counter()
    _save_reference_adapter(accelerator.unwrap_model(unet), Path(args.workdir) / "reference.safetensors")
    fixed = {"start_and_imports": imported - began, "load": loaded - imported}
    fixed["final_save"] = time.perf_counter() - trained
    return {
        "step_seconds": seconds,
        "end_to_end_s": time.perf_counter() - began,
        "fixed_seconds": fixed,
        "phase_seconds_per_step": phases,
        **_peak_memory(),
    }


def _snapshot(args: argparse.Namespace, accelerator, unet, step: int) -> None:
    """The adapter so far, every `snapshot_every` steps, for scripts/bench_concept.py (off here)."""
    every = getattr(args, "snapshot_every", 0)
    if every and step % every == 0:
        path = Path(args.snapshot_dir) / f"step-{step:06d}.safetensors"
        _save_reference_adapter(accelerator.unwrap_model(unet), path)


def _over_budget(args: argparse.Namespace) -> bool:
    """Past the wall-clock budget of scripts/bench_concept.py (none here)."""
    budget = getattr(args, "budget_s", None)
    return budget is not None and time.time() - args.started_at > budget


def _save_reference_adapter(unet, path: Path) -> None:
    """What the reference script does at its end: `StableDiffusionPipeline.save_lora_weights` of the peft
    state dict in diffusers' naming, so both sides' end-to-end time stops at an adapter on disk."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(path.parent),
        unet_lora_layers=state,
        weight_name=path.name,
        safe_serialization=True,
    )


_PHASES = ("data", "vae_encode", "text_encode", "unet_forward", "backward", "optimizer")


class _Phases:
    """Adds the wall time since the previous mark to a phase. The CPU runs each op to completion before the
    next starts, so marks between phases split the step exactly (on CUDA the marks synchronise first)."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now


def _reference_loop(args, accelerator, unet, vae, text_encoder, noise_scheduler, optimizer, loader,
                    lr_scheduler, lora_layers, compute_snr, F) -> tuple[list[float], dict[str, float]]:  # fmt: skip
    """Each step's wall time (its data loading included), and the mean seconds per steady-state step spent
    in each phase."""
    import torch

    seconds: list[float] = []
    phases = dict.fromkeys(_PHASES, 0.0)
    global_step = 0
    unet.train()
    while global_step < args.steps:
        began = time.perf_counter()
        clock = _Phases(dict.fromkeys(_PHASES, 0.0))
        for batch in loader:
            clock.mark("data")
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                clock.mark("vae_encode")
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
                )
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                clock.mark("text_encode")
                target = noise  # epsilon prediction (the embedded model's and SD 1.5's)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                snr = compute_snr(noise_scheduler, timesteps)
                weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
                accelerator.gather(loss.repeat(bsz)).mean().item()
                clock.mark("unet_forward")
                accelerator.backward(loss)
                clock.mark("backward")
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                clock.mark("optimizer")
            _snapshot(args, accelerator, unet, global_step + 1)
            now = time.perf_counter()
            seconds.append(now - began)
            began = now
            if global_step >= args.warmup:  # phases over the steady-state steps only, like steps/s
                for phase, value in clock.totals.items():
                    phases[phase] += value
            clock = _Phases(dict.fromkeys(_PHASES, 0.0))
            global_step += 1
            if global_step >= args.steps or _over_budget(args):
                break
        if _over_budget(args):
            break
    measured = max(1, args.steps - args.warmup)
    return seconds[: args.steps], {phase: total / measured for phase, total in phases.items()}


# ------------------------------------------------------------------------------------------ parent


def _child(kind: str, args: argparse.Namespace) -> dict:
    """One side's run in a process of its own: this script's own command line (so every option reaches
    the child as given), the side and its work folder added."""
    command = [sys.executable, args.script, *args.argv, "--child", kind, "--workdir", args.workdir]
    command += ["--model", args.model] if args.model else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(result: dict, warmup: int) -> dict:
    steady = result["step_seconds"][warmup:] or result["step_seconds"]
    return {
        "steps_per_s": 1.0 / statistics.median(steady),
        "end_to_end_s": result["end_to_end_s"],
        "peak_rss_mib": result["peak_rss_mib"],
        "fixed_seconds": {k: round(v, 2) for k, v in result["fixed_seconds"].items()},
        **(
            {"phase_seconds_per_step": result["phase_seconds_per_step"]}
            if "phase_seconds_per_step" in result
            else {}
        ),
        **({"peak_cuda_mib": result["peak_cuda_mib"]} if "peak_cuda_mib" in result else {}),
    }


def common_parser(description: str, default_data: Path) -> argparse.ArgumentParser:
    """The options every training benchmark shares (its own are added by the caller)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data", nargs="?", default=str(default_data))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state median")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs per side; the fastest counts"
    )
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--child", choices=["difflora", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser


def compare(
    args: argparse.Namespace, sides: dict[str, Callable], script: str, settings: tuple[str, ...]
) -> None:
    """Run as a child (one side, `sides[args.child]`, its result as JSON on stdout) or as the parent: both
    sides alternately `args.repeats` times, each in its own process, then the report (fastest run per side,
    ratios difflora / reference) on stdout and in `args.json`."""
    began = time.perf_counter()
    if args.child:
        print(json.dumps(sides[args.child](args, began)))
        return
    args.script, args.argv = script, sys.argv[1:]
    runs: dict[str, list[dict]] = {"difflora": [], "reference": []}
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
            for kind in runs:
                runs[kind].append(_summary(_child(kind, args), args.warmup))
                print(f"{kind}: {json.dumps(runs[kind][-1])}", file=sys.stderr, flush=True)
    ours, reference = (max(r, key=lambda s: s["steps_per_s"]) for r in runs.values())
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: getattr(args, k) for k in settings},
        "difflora": ours,
        "reference": reference,
        "all_runs_steps_per_s": {k: [round(r["steps_per_s"], 2) for r in v] for k, v in runs.items()},
        "throughput_ratio": ours["steps_per_s"] / reference["steps_per_s"],
        "peak_rss_ratio": ours["peak_rss_mib"] / reference["peak_rss_mib"],
        "end_to_end_ratio": reference["end_to_end_s"] / ours["end_to_end_s"],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = common_parser(__doc__.split("\n\n")[0], REPO / "sample_data" / "style")
    parser.add_argument("--model", default=None, help="default: the embedded model (or --base's)")
    parser.add_argument(
        "--base",
        choices=["embedded", "sd15", "sdxl"],
        default="embedded",
        help="sd15 / sdxl: SD 1.5 / SDXL size, random weights",
    )
    parser.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "difflora-bench-models"))
    parser.add_argument(
        "--with-outputs",
        action="store_true",
        help="difflora renders its default sample grids and checkpoints",
    )
    args = parser.parse_args()
    if not args.child and args.base != "embedded" and not args.model:
        args.model = str(random_base(args.base, Path(args.models_dir)))
    settings = (
        "data",
        "base",
        "model",
        "steps",
        "batch_size",
        "rank",
        "resolution",
        "threads",
        "with_outputs",
    )
    compare(args, {"difflora": run_difflora, "reference": run_reference}, __file__, settings)


if __name__ == "__main__":
    main()
