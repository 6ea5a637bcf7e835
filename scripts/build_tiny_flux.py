"""Pretrain difflora's tiny Flux-architecture model on the embedded model's shape world.

Real diffusers/transformers classes throughout, so `FluxPipeline.from_pretrained(folder)` runs it:
transformer FluxTransformer2DModel (2 double + 2 single blocks, width 64, guidance embedding on,
in_channels 16 = 4 latent channels x the 2x2 packed patch); the embedded SD model's VAE (64x64 <->
16x16x4, so vae_scale_factor 4 and 64 image tokens; shift_factor 0 written for FluxPipeline) and CLIP
text encoder (pooled output, 32 tokens); a 1-layer T5EncoderModel, random and frozen, with a T5 Unigram
tokenizer built from the captions (no T5 vocabulary ships in any installed package); Flux-dev's
FlowMatchEulerDiscreteScheduler. Text encoders are frozen and the VAE latents cached: each step runs
the transformer only. Rectified flow (noisy = (1 - s) x0 + s e, target e - x0), s logit-normal shifted
by the pipeline's exp(mu) at 64 tokens; 10% empty captions; guidance input uniform in [1, 5].
Token length: trained at T5 max_sequence_length 32 (512 costs 9x per step on CPU); call the pipeline
with max_sequence_length=32. Details and numbers: difflora/embedded/flux/README.md.

    nice -n 10 python scripts/build_tiny_flux.py train --out /tmp/flux --minutes 60 --lr 6e-4
    python scripts/build_tiny_flux.py ship --model /tmp/flux/last   (measures, writes the folder)
    nice -n 10 python scripts/build_tiny_flux.py train --init difflora/embedded/flux --steps 800 --lr 1.5e-4
        (continues pretraining a saved folder: fresh warm-up and cosine; report.json keeps each phase)
    python scripts/build_tiny_flux.py readme   (rewrites README.md from an edited report.json)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from eval_embedded_model import evaluate, machine  # noqa: E402
from flux_readme import readme  # noqa: E402
from pretrain_embedded_model import StepBudget, cosine_lr, n_params, to_tensor  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402

from difflora.embedded import EMBEDDED_MODEL_DIR, shapes  # noqa: E402

T5_TOKENS = 32
IMAGE_SIZE = shapes.IMAGE_SIZE
# How the model is called everywhere it is measured. True CFG 5 over "" lifted shape accuracy from 25% to
# 75% on a 12-prompt check of the step-1000 checkpoint (3: 67%), colour stayed 100%.
PIPELINE_CALL = {
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
    "max_sequence_length": T5_TOKENS,
    "true_cfg_scale": 5.0,
    "negative_prompt": "",
}
SCHEDULER_CONFIG = {  # Flux-dev's: dynamic shifting from the image token count
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 128,
    "guidance_embeds": True,
    "axes_dims_rope": (8, 12, 12),
}


# ---------------------------------------------------------------- components
def tokenizer_corpus() -> list[str]:
    """Every caption the shape world has, the sample concepts' trigger words included."""
    base = [
        f"a {c} {s} on a {b} background"
        for c in shapes.COLOURS
        for s in (*shapes.SHAPES, shapes.SUBJECT_TRIGGER)
        for b in shapes.BACKGROUNDS
    ]
    return base + [f"{c}, {shapes.STYLE_TRIGGER} style" for c in base]


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 Unigram tokenizer (<pad>=0, </s>=1, <unk>=2) fitted to the captions.

    Pieces: every caption word as "▁word" scored by its log frequency (the maximum-likelihood unigram
    model of the corpus), plus single letters, digits and punctuation at a low score so any other
    word still tokenizes (letter by letter) instead of becoming <unk>.
    """
    counts = Counter(w for c in tokenizer_corpus() for w in c.replace(",", " ,").split())
    total = sum(counts.values())
    words = [(("" if w == "," else "▁") + w, math.log(n / total)) for w, n in sorted(counts.items())]
    chars = [(ch, -20.0) for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.-'!?:;"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *words]
    vocab += [c for c in chars if c[0] not in {p for p, _ in vocab}]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_TOKENS)


def build_t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=T5_TOKENS,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def load_embedded() -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The embedded SD model's VAE, CLIP text encoder and tokenizer, in float32."""
    vae = AutoencoderKL.from_pretrained(EMBEDDED_MODEL_DIR / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline adds it when decoding; None would fail
    clip = CLIPTextModel.from_pretrained(EMBEDDED_MODEL_DIR / "text_encoder", dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")
    return vae.eval(), clip.eval(), tok


def assemble(vae, clip, clip_tok, t5, t5_tok, transformer) -> FluxPipeline:
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


# ---------------------------------------------------------------- cached inputs
@torch.no_grad()
def packed_latents(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """[N, 64, 16] packed, scaled latents (posterior mode), computed once."""
    lat = torch.cat(
        [
            vae.encode(to_tensor(images[i : i + 256], "cpu")).latent_dist.mode()
            for i in range(0, len(images), 256)
        ]
    )
    lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
    n, c, h, w = lat.shape
    return FluxPipeline._pack_latents(lat, n, c, h, w)


@torch.no_grad()
def text_table(pipe: FluxPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """T5 sequence and CLIP pooled embeddings of every distinct caption (and ""), as the pipeline makes them."""
    unique = sorted(set(captions) | {""})
    t5, pooled, _ = pipe.encode_prompt(unique, prompt_2=None, device="cpu", max_sequence_length=T5_TOKENS)
    return t5, pooled, {c: i for i, c in enumerate(unique)}


def image_shift() -> float:
    """exp(mu) that FluxPipeline applies to its sigmas at this image size (64 tokens)."""
    cfg = SCHEDULER_CONFIG
    tokens = (IMAGE_SIZE // 8) ** 2
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return math.exp(m * tokens + cfg["base_shift"] - m * cfg["base_image_seq_len"])


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal(0, 1) times, shifted like the pipeline's schedule so training sees its noise levels."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    s = image_shift()
    return s * u / (1 + (s - 1) * u)


# ---------------------------------------------------------------- training
class Data:
    """Cached training inputs: packed latents, per-image caption index, text embedding tables."""

    def __init__(self, pipe: FluxPipeline, n_images: int, seed: int, cache: Path) -> None:
        images, captions = shapes.base_batch(seed, n_images)
        path = cache / f"latents-{seed}-{n_images}.pt"  # encoding is ~0.1 s per image on one CPU core
        if not path.exists():
            torch.save(packed_latents(pipe.vae, images), path)
        self.latents = torch.load(path)
        self.t5, self.pooled, index = text_table(pipe, captions)
        self.caption = torch.tensor([index[c] for c in captions])
        self.empty = index[""]
        self.img_ids = FluxPipeline._prepare_latent_image_ids(
            1, IMAGE_SIZE // 8, IMAGE_SIZE // 8, "cpu", torch.float32
        )
        self.txt_ids = torch.zeros(T5_TOKENS, 3)


def flow_loss(model: FluxTransformer2DModel, data: Data, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity loss on one random batch (10% empty captions, random guidance input)."""
    idx = torch.randint(0, len(data.latents), (batch,), generator=gen)
    x0 = data.latents[idx]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = sample_sigmas(batch, gen)
    noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    cap = torch.where(torch.rand(batch, generator=gen) < 0.1, data.empty, data.caption[idx])
    pred = model(
        hidden_states=noisy,
        encoder_hidden_states=data.t5[cap],
        pooled_projections=data.pooled[cap],
        timestep=sigma,
        img_ids=data.img_ids,
        txt_ids=data.txt_ids,
        guidance=1 + 4 * torch.rand(batch, generator=gen),
    ).sample
    return F.mse_loss(pred, noise - x0)


class Ema:
    """Exponential moving average of the parameters, swapped in for checks and saving."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.params = list(model.parameters())
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.backup = decay, None

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def check(pipe: FluxPipeline, subset: int | None, seeds: list[int], steps: int, guidance: float) -> dict:
    """Colour/shape accuracy with the embedded evaluation, through FluxPipeline at 64x64, 32 T5 tokens,
    with true classifier-free guidance against the empty prompt (the guidance embedding carries no signal)."""
    call = partial(pipe, **PIPELINE_CALL)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        result = evaluate(call, seeds=seeds, steps=steps, guidance=guidance, subset=subset)
    return {**result, "true_cfg_scale": PIPELINE_CALL["true_cfg_scale"]}


def save_pipeline(pipe: FluxPipeline, out: Path) -> None:
    """Diffusers layout, fp16 weights; text encoders load as float32, the CLIP tokenizer as BPE files."""
    shutil.rmtree(out, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(out)
    pipe.to(torch.float32)
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(EMBEDDED_MODEL_DIR / "tokenizer" / name, out / "tokenizer" / name)
    for sub in ("text_encoder", "text_encoder_2"):
        path = out / sub / "config.json"
        cfg = json.loads(path.read_text())
        cfg["dtype"] = "float32"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def checkpoint(pipe: FluxPipeline, ema: Ema, args: argparse.Namespace, state: dict) -> None:
    """Measure the averaged weights on the check grid, save them as last/, and as best/ if they beat it."""
    ema.swap()
    result = check(pipe, args.check_prompts, [0], args.check_steps, 3.5)
    result.pop("per_prompt")
    colour, shape = result["colour_accuracy"], result["shape_accuracy"]
    print(f"check step {state['steps']}: colour {colour:.2f} shape {shape:.2f}", flush=True)
    out = Path(args.out)
    save_pipeline(pipe, out / "last")
    ema.swap()
    report = {**state, "check": result, "seconds": round(time.time() - state["t0"], 1)}
    report.pop("t0")
    (out / "last" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if colour + shape >= state.get("best_score", -1.0):
        state["best_score"] = colour + shape
        shutil.rmtree(out / "best", ignore_errors=True)
        shutil.copytree(out / "last", out / "best")
        print(f"best so far: step {state['steps']}", flush=True)


def initial_pipeline(init: str | None) -> FluxPipeline:
    """A fresh pipeline (random transformer and T5), or a saved one to continue pretraining from.

    Continuing loads every component from the folder: its T5 is random-initialised, so a new one would
    give the transformer text features it never saw.
    """
    if init is None:
        vae, clip, clip_tok = load_embedded()
        t5_tok = build_t5_tokenizer()
        t5 = build_t5(len(t5_tok)).eval()
        return assemble(vae, clip, clip_tok, t5, t5_tok, FluxTransformer2DModel(**TRANSFORMER_CONFIG))
    pipe = FluxPipeline.from_pretrained(init, torch_dtype=torch.float32)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.eval()
    return pipe


def previous_training(init: Path) -> dict:
    """What the continued-from folder's report says about its own training (kept through every phase)."""
    report = json.loads((init / "report.json").read_text())
    keys = ("steps", "batch", "lr", "train_seconds", "date", "note", "previous")
    return {k: report[k] for k in keys if k in report}


def train(args: argparse.Namespace) -> None:
    t0 = time.time()
    torch.manual_seed(args.seed)
    pipe = initial_pipeline(args.init)
    vae, clip, t5, model = pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer
    data = Data(pipe, args.images, args.seed + 1, Path(args.out))
    parts = {"transformer": model, "text_encoder": clip, "text_encoder_2": t5, "vae": vae}
    params = {name: n_params(module) for name, module in parts.items()}
    print(f"data: {tuple(data.latents.shape)} latents ({time.time() - t0:.0f}s); params {params}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ema, gen = Ema(model, args.ema), torch.Generator().manual_seed(args.seed)
    state = {
        "t0": t0,
        "steps": 0,
        "params": params,
        **{k: getattr(args, k) for k in ("batch", "lr", "images")},
    }
    if args.init:
        state["previous"] = previous_training(Path(args.init))
    budget, step, t_train = StepBudget(args.steps, args.minutes, "flux"), 0, time.time()
    model.train()
    while step < budget.update(step):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, budget.total, 100)
        loss = flow_loss(model, data, args.batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(step)
        step += 1
        if step % 50 == 0:
            print(f"step {step}/{budget.total} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if step % args.check_every == 0 or step == budget.total:
            state.update(steps=step, train_seconds=round(time.time() - t_train, 1))
            checkpoint(pipe, ema, args, state)
    print(f"done: {step} steps in {time.time() - t0:.0f}s", flush=True)


def ship(args: argparse.Namespace) -> None:
    """Measure a saved folder on the full grid, copy it to DEST with report.json and README.md."""
    src, dest = Path(args.model), Path(args.dest)
    pipe = FluxPipeline.from_pretrained(src, torch_dtype=torch.float32)
    t0 = time.time()
    result = check(pipe, None, list(range(args.seeds)), args.check_steps, 3.5)
    result["eval_seconds"] = round(time.time() - t0, 1)
    per_prompt = result.pop("per_prompt")
    report = json.loads((src / "report.json").read_text())
    report.pop("best_score", None)
    report.update(accuracy=result, smoke_prompt=smoke_prompt(per_prompt), machine=machine())
    report.update(shipped_from=src.name, date=time.strftime("%Y-%m-%d", time.gmtime()))
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    (dest / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (dest / "README.md").write_text(readme(report))
    # what difflora generates and trains with (difflora.models.families.base.MODEL_DEFAULTS_FILE)
    defaults = {"max_sequence_length": 32, "resolution": 64, "true_cfg": report["accuracy"]["true_cfg_scale"]}
    (dest / "difflora_defaults.json").write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2), flush=True)


def smoke_prompt(per_prompt: list[dict]) -> list[str]:
    """(colour, shape, background) of the first grid prompt whose every seed had the right colour."""
    for entry in per_prompt:
        _, colour, shape, _, _, bg, _ = entry["prompt"].split()  # "a red circle on a white background"
        if all(c == colour for c in entry["colours"]):
            return [colour, shape, bg]
    raise SystemExit("no prompt drew its colour at every seed: the model is not fit to ship")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["train", "ship", "readme"])
    parser.add_argument("--out", default="/tmp/flux", help="train: folder for last/ and best/")
    parser.add_argument("--model", help="ship: the saved pipeline folder (OUT/best)")
    parser.add_argument(
        "--dest", default=str(ROOT / "difflora" / "embedded" / "flux"), help="ship: destination"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="train: a saved pipeline folder to continue pretraining from")
    parser.add_argument("--steps", type=int, default=100_000, help="optimizer steps (or fit --minutes)")
    parser.add_argument("--minutes", type=float, help="fit the step count to this training time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=3072, help="procedurally drawn training images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--check-every", type=int, default=500)
    parser.add_argument("--check-prompts", type=int, default=18, help="train: prompts in each check")
    parser.add_argument("--check-steps", type=int, default=20, help="Euler steps per image in checks")
    parser.add_argument("--seeds", type=int, default=2, help="ship: seeds per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "train":
        train(args)
    elif args.stage == "readme":  # after editing DEST/report.json by hand (e.g. its measured `loras`)
        dest = Path(args.dest)
        (dest / "README.md").write_text(readme(json.loads((dest / "report.json").read_text())))
    else:
        if not args.model:
            parser.error("stage ship needs --model OUT/best")
        ship(args)


if __name__ == "__main__":
    main()
