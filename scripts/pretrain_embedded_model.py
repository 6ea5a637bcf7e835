"""Pretrain difflora's embedded base model from scratch: a complete, tiny Stable Diffusion 1.x.

Components, all real diffusers/transformers classes so every SD tool treats it as SD1:
  AutoencoderKL (3 blocks, downsampling 4, 4 latent channels: 64x64 images <-> 16x16x4 latents),
  CLIPTextModel + CLIPTokenizer (real CLIP BPE vocabulary, 32 tokens),
  UNet2DConditionModel (cross-attention at 16x16 and 8x8 plus the mid block), SD1 scheduler config.

Stages (data from difflora.embedded.shapes, drawn on the fly from seeds, nothing read from disk):
  vae   train the autoencoder alone, then measure PSNR on held-out pretraining images and on the two
        sample concepts (stripes, crosses); scaling_factor = 1 / std of latents. Saves OUT/vae.
  main  cache latents of base scenes once, train text encoder + UNet jointly (epsilon, min-SNR-5,
        10% empty captions for classifier-free guidance, EMA), save the pipeline in diffusers layout
        to OUT/model (fp16 weights), and report a quick prompt-following check.

Commands used for the shipped model (one NVIDIA H100, 2026-11-22; vae 189 s, main 279 s):
  python scripts/pretrain_embedded_model.py vae  --out /tmp/run --minutes 2.8 --batch 128
      (-> 4357 steps; repeat exactly with --steps 4357)
  python scripts/pretrain_embedded_model.py main --vae /tmp/run/vae --out /tmp/run --minutes 4.2 \\
      --batch 256 --check-seeds 0      (-> 3280 steps; repeat exactly with --steps 3280)
  then copy /tmp/run/model/* to difflora/embedded/model/.
CPU reproduction: the same with --device cpu (the default without CUDA) and --steps/--batch to
taste; at ~1.3 s per main step on 2 cores, expect hours for a model as good as the shipped one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from difflora.embedded import shapes  # noqa: E402

TOKENIZER_DIR = ROOT / "difflora" / "embedded" / "model" / "tokenizer"
MAX_TOKENS = 32
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def build_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=128,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=8,
    )


def build_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=MAX_TOKENS
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- data (parallel, seeded per chunk)
def _chunk(args: tuple[str, int, int]) -> tuple[np.ndarray, list[str]]:
    kind, seed, n = args
    if kind == "autoencoder":
        return shapes.autoencoder_batch(seed, n), []
    return getattr(shapes, f"{kind}_batch")(seed, n)


def make_images(kind: str, seed: int, n: int, chunk: int = 4096) -> tuple[np.ndarray, list[str]]:
    """n images of a kind, drawn in seeded chunks across processes (same result for any worker count)."""
    jobs = [(kind, seed * 100_003 + i, min(chunk, n - i * chunk)) for i in range(math.ceil(n / chunk))]
    with ProcessPoolExecutor() as pool:
        parts = list(pool.map(_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in -1..1."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class StepBudget:
    """Fixed step count, or (with --minutes) the count that fits the time, measured on steps 20-120.

    The count chosen is printed so that a run can be repeated exactly with --steps.
    """

    def __init__(self, steps: int, minutes: float | None, label: str) -> None:
        self.total, self.minutes, self.label = steps, minutes, label
        self.t_start = self.t20 = time.time()

    def update(self, step: int) -> int:
        if self.minutes is not None and step in (20, 120) and torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels run asynchronously: time what has finished
        if self.minutes is not None and step == 20:
            self.t20 = time.time()
        if self.minutes is not None and step == 120:
            per_step = (time.time() - self.t20) / 100
            left = self.minutes * 60 - (time.time() - self.t_start)
            self.total = min(self.total, 120 + int(left / per_step))
            print(
                f"{self.label}: {per_step * 1000:.1f} ms/step -> {self.total} steps (repeat with --steps {self.total})"
            )
        return self.total


def autocast(device: str):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


# ---------------------------------------------------------------- VAE
@torch.no_grad()
def psnr(vae: AutoencoderKL, images: np.ndarray, device: str) -> float:
    """Mean PSNR (dB, 8-bit peak) of encode(mode) -> decode over the images."""
    vae.eval()
    vals = []
    for i in range(0, len(images), 256):
        x = to_tensor(images[i : i + 256], device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        vals.append(-10 * torch.log10(mse))
    vae.train()
    return float(torch.cat(vals).mean())


def train_vae(args: argparse.Namespace) -> None:
    t0 = time.time()
    device = args.device
    pool = torch.from_numpy(make_images("autoencoder", args.seed, args.images)[0]).to(device)
    print(f"vae data: {len(pool)} images in {time.time() - t0:.0f}s", flush=True)
    vae = build_vae().to(device)
    print(f"vae params: {n_params(vae):,}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    budget, step = StepBudget(args.steps, args.minutes, "vae"), 0
    while step < budget.update(step):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, budget.total, 200)
        idx = torch.randint(0, len(pool), (args.batch,), generator=gen, device=device)
        x = pool[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
        rec = rec.float()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == budget.total - 1:
            print(f"vae step {step} loss {loss.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    report = measure_vae(vae, args.seed, device)
    out = Path(args.out) / "vae"
    vae.register_to_config(scaling_factor=report["scaling_factor"])
    vae.save_pretrained(out)
    report["seconds"] = round(time.time() - t0, 1)
    (Path(args.out) / "vae_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)


def measure_vae(vae: AutoencoderKL, seed: int, device: str) -> dict:
    """PSNR on held-out sets (seeds never used in training) and the latent scaling factor."""
    held = 10_000 + seed
    base = shapes.base_batch(held, 1024)[0]
    report = {
        "psnr_base_heldout": psnr(vae, base, device),
        "psnr_style": psnr(vae, shapes.style_batch(held + 1, 512)[0], device),
        "psnr_subject": psnr(vae, shapes.subject_batch(held + 2, 512)[0], device),
    }
    with torch.no_grad():
        lat = torch.cat(
            [
                vae.encode(to_tensor(base[i : i + 256], device)).latent_dist.sample()
                for i in range(0, 1024, 256)
            ]
        )
    report["latent_std"] = float(lat.std())
    report["scaling_factor"] = round(1.0 / float(lat.std()), 5)
    return report


# ---------------------------------------------------------------- text encoder + UNet
@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, device: str) -> torch.Tensor:
    """Scaled latents (posterior mode) of all images, computed once: the UNet never sees pixels."""
    out = [
        vae.encode(to_tensor(images[i : i + 1024], device)).latent_dist.mode()
        for i in range(0, len(images), 1024)
    ]
    return torch.cat(out) * vae.config.scaling_factor


def caption_tokens(tokenizer: CLIPTokenizer, captions: list[str], device: str) -> tuple[torch.Tensor, ...]:
    """Token ids per image for: the full caption, the caption without its background, the empty prompt."""
    unique = sorted(set(captions) | {c.split(" on a ")[0] for c in captions} | {""})
    ids = tokenizer(unique, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    table = ids.input_ids.to(device)
    pos = {c: i for i, c in enumerate(unique)}
    full = torch.tensor([pos[c] for c in captions], device=device)
    short = torch.tensor([pos[c.split(" on a ")[0]] for c in captions], device=device)
    return table, full, short, torch.tensor(pos[""], device=device)


def train_main(args: argparse.Namespace) -> None:
    t0 = time.time()
    device = args.device
    torch.manual_seed(args.seed)
    images, captions = make_images("base", args.seed + 1, args.images)  # before CUDA starts: forks
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).to(device).eval()
    latents = encode_latents(vae, images, device)
    table, full, short, empty = caption_tokens(build_tokenizer(), captions, device)
    print(
        f"data: {len(latents)} latents {tuple(latents.shape[1:])}, std {latents.std():.3f} ({time.time() - t0:.0f}s)"
    )
    te, unet = build_text_encoder().to(device), build_unet().to(device)
    print(
        f"params: text encoder {n_params(te):,}, unet {n_params(unet):,}, vae {n_params(vae):,}", flush=True
    )
    params = [*te.parameters(), *unet.parameters()]
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ac = DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.to(device)
    snr = ac / (1 - ac)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    budget, step = StepBudget(args.steps, args.minutes, "main"), 0
    while step < budget.update(step):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, budget.total, 300)
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen, device=device)
        lat = latents[idx]
        noise = torch.randn(lat.shape, generator=gen, device=device)
        t = torch.randint(0, 1000, (args.batch,), generator=gen, device=device)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        r = torch.rand(args.batch, generator=gen, device=device)
        ids = table[torch.where(r < 0.1, empty, torch.where(r < 0.2, short[idx], full[idx]))]
        with autocast(device):
            pred = unet(noisy, t, te(ids)[0]).sample
        weight = snr[t].clamp(max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        loss = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        if step % 500 == 0 or step == budget.total - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    pipe = save_pipeline(vae, te, unet, Path(args.out) / "model")
    print(f"trained and saved in {time.time() - t0:.0f}s", flush=True)
    quick_check(pipe.to(device), args.check_seeds)


def save_pipeline(vae, te, unet, out: Path) -> StableDiffusionPipeline:
    """Diffusers layout, weights in fp16 (the folder must stay small), loadable offline as SD1."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to("cpu", torch.float16).save_pretrained(out)
    finish_layout(out)
    return pipe.to(torch.float32)


def finish_layout(out: Path) -> None:
    """Ship the committed BPE files instead of a 3.6 MB tokenizer.json, and load in float32 by default.

    transformers 5 loads a checkpoint in its stored dtype ("auto"); the text encoder's config says
    float32 so a plain `from_pretrained(path)` gives an fp32 pipeline like the UNet and VAE.
    """
    tok = out / "tokenizer"
    (tok / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (tok / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    cfg_path = out / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def quick_check(pipe: StableDiffusionPipeline, n_seeds: int) -> None:
    """Prompt-following check with the evaluation script's measures (the full eval runs on CPU)."""
    from eval_embedded_model import evaluate

    if n_seeds <= 0:
        return
    t0 = time.time()
    pipe.set_progress_bar_config(disable=True)
    result = evaluate(pipe, seeds=list(range(n_seeds)), steps=20, guidance=7.5)
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=2))
    print(f"quick check {time.time() - t0:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["vae", "main"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="folder for vae/ (stage vae) or model/ (stage main)")
    parser.add_argument("--vae", help="stage main: the trained VAE folder (OUT/vae of stage vae)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="optimizer steps (default: vae 6000, main 8000)")
    parser.add_argument("--minutes", type=float, help="fit the step count to this training time instead")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=100_000, help="procedurally drawn training images")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: vae 1e-3, main 1e-3)")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument(
        "--check-seeds", type=int, default=2, help="stage main: seeds per prompt in the check"
    )
    args = parser.parse_args()
    args.steps = args.steps or (100_000 if args.minutes else 6000 if args.stage == "vae" else 8000)
    args.lr = args.lr or 1e-3
    torch.manual_seed(args.seed)
    start = time.time()
    if args.stage == "vae":
        train_vae(args)
    else:
        if not args.vae:
            parser.error("stage main needs --vae OUT/vae (run stage vae first)")
        train_main(args)
    print(f"{args.stage} stage ran {time.time() - start:.0f}s on {args.device}")


if __name__ == "__main__":
    main()
