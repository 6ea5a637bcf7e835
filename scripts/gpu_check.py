"""difflora at full size on a CUDA GPU: SD 1.5 at 512 px and SDXL at 1024 px, each trained with the README's
low-memory settings and with fast settings, and Flux.1 dev and Chroma at 1024 px in bf16, with an fp8 base
and gradient checkpointing, and with blocks swapped (`--blocks-to-swap`), then generating with two adapters
composed; Qwen-Image at 1024 px with Flux's three settings (`--bases qwen-image`), and SD3.5 large and medium
at 1024 px with them too (`--bases sd35-large sd35-medium`: not in the default run, whose Flux and Chroma
already write ~60 GB of weights; SD3.5 large writes ~27 GB, medium ~16 GB).

The bases are random weights built from the shipped configs (difflora/models/architectures/), written once
as diffusers folders under --models-dir; batch 1, LoRA rank 16 on the attention projections. Per training
configuration: the plan's estimated peak memory, the median step time after --warmup steps (difflora's own per-step log), the peak allocated
GPU memory of the whole run (torch.cuda.max_memory_allocated: load, caching and steps), the FLOPs of one
training step (forward + backward, counted on the meta device: model FLOPs, so checkpointing's recompute is
not counted), the achieved TFLOP/s and the MFU against the GPU's dense bf16 peak (--peak-tflops overrides
the table in gpu_check_support.py). Per base: seconds per image with the two adapters fused vs the base.

Prints a Markdown table ready for BENCHMARKS.md (and writes it to --out, the raw numbers to --json); exits
with 1 when any configuration failed, after reporting the others.

    python scripts/gpu_check.py [--out gpu-check.md] [--json gpu-check.json] [--compile] [--steps 12]
    python scripts/gpu_check.py --dry-run   # the same code on the CPU, the tiny embedded model, 2 steps
    python scripts/gpu_check.py --dry-run --bases flux   # the Flux rows on the tiny Flux (no CUDA: the
                                                          # swap row reports the flag's refusal and fails)
    python scripts/gpu_check.py --dry-run --bases chroma  # the same rows on a tiny Chroma built from it
    python scripts/gpu_check.py --bases qwen-image   # Qwen-Image at 1024 px (its own run: ~57 GB of weights)
    python scripts/gpu_check.py --bases sd35-large sd35-medium  # SD3.5 at 1024 px (its own run: ~43 GB)
    python scripts/gpu_check.py --dry-run --bases sd35-medium  # on a reduced SD3.5 built from its configs
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import random_base, tiny_chroma, tiny_qwen_image, tiny_sd35
from gpu_check_support import (
    GenerateRow,
    Report,
    TrainRow,
    median_step_seconds,
    mfu,
    one_line,
    peak_tflops,
    planned_peak_gib,
    transformer_flops,
    unet_flops,
    write_images,
)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# Flux's attention preset (difflora.models.families.flux): both streams' projections in the double blocks;
# SD3's (difflora.models.families.sd3) is the same, in its joint blocks
FLUX_ATTENTION = (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
RANK = 16
BASES = {
    "sd15": 512,
    "sdxl": 1024,
    "flux": 1024,
    "chroma": 1024,
    "qwen-image": 1024,
    "sd35-large": 1024,
    "sd35-medium": 1024,
}  # base -> training/sampling px
TRANSFORMERS = (
    "flux",
    "chroma",
    "qwen-image",
    "sd35-large",
    "sd35-medium",
)  # the bases whose denoiser is a transformer (bf16, fp8, block swap)
# Run by default; Qwen-Image (20.4 B + 8.3 B random bf16 weights, ~57 GB on disk) runs alone: --bases qwen-image;
# SD3.5 (large 8.1 B + medium 2.5 B, each with 5.5 B of text encoders: ~43 GB) too: --bases sd35-large sd35-medium
DEFAULT_BASES = ("sd15", "sdxl", "flux", "chroma")
SWAP = 18  # Flux.1's blocks in CPU memory in the swap row: kohya's low-memory Flux settings swap 18 for 12 GB
PROMPT = "a red circle on a white background"


@dataclass(frozen=True)
class Base:
    label: str
    folder: Path | None  # None: difflora's embedded model
    resolution: int
    transformer: bool = False  # a DiT (Flux, Chroma, Qwen-Image, SD3.5; else a UNet)

    @property
    def targets(self) -> tuple[str, ...]:
        return FLUX_ATTENTION if self.transformer else ATTENTION

    @property
    def model_dir(self) -> Path:
        from difflora.embedded import EMBEDDED_MODEL_DIR

        return self.folder or EMBEDDED_MODEL_DIR


@dataclass(frozen=True)
class Settings:
    name: str
    gradient_checkpointing: bool
    compile: bool
    quantize_base: str | None = None
    blocks_to_swap: int = 0


def settings_of(args: argparse.Namespace, base: Base) -> list[Settings]:
    """The README's low-memory settings, and the fast ones (no recompute, optionally compiled); for Flux
    the README's bf16, fp8 + checkpointing, and fp8 + checkpointing with blocks swapped."""
    precision = "fp32" if args.precision == "no" else args.precision
    fast = precision + (", compile" if args.compile else "")
    if base.transformer:
        swap = min(SWAP, args.swap_limit)
        return [
            Settings(fast, False, args.compile),
            Settings("fp8, checkpointing", True, False, "fp8"),
            Settings(f"fp8, checkpointing, swap {swap}", True, False, "fp8", swap),
        ]
    return [Settings(f"{precision}, checkpointing", True, False), Settings(fast, False, args.compile)]


def flops_of(base: Base) -> tuple[int, int]:
    """FLOPs of the denoiser's forward pass and of a training step (forward + backward) on `base`."""
    count = {"rank": RANK, "targets": base.targets}
    flops = transformer_flops if base.transformer else unet_flops
    forward = flops(base.model_dir, base.resolution, backward=False, **count)
    return forward, flops(base.model_dir, base.resolution, **count)


def train_row(
    base: Base, settings: Settings, flops: tuple[int, int], work: Path, args: argparse.Namespace
) -> tuple[TrainRow, Path]:
    """Train `base` with `settings`; the row and the adapter's path (which exists only when it succeeded)."""
    import torch

    import difflora

    row = TrainRow(base.label, base.resolution, settings.name, forward_flops=flops[0], step_flops=flops[1])
    name = "fast" if not settings.gradient_checkpointing else "swap" if settings.blocks_to_swap else "lowmem"
    out = work / base.label / "adapters"
    try:
        _reset_peak_memory()
        config = difflora.TrainConfig(
            data_dir=str(write_images(work / base.label / "images", base.resolution)),
            model=str(base.folder) if base.folder else None, output_dir=str(out), name=name,
            cache_dir=str(work / base.label / "cache"), resolution=base.resolution, batch_size=1,
            rank=RANK, alpha=float(RANK), unet_targets=base.targets, max_steps=args.steps, save_every=0,
            sample_every=0, mixed_precision=args.precision, gradient_checkpointing=settings.gradient_checkpointing,
            compile=settings.compile, lr_scheduler="constant", lr_warmup_steps=0,
            quantize_base=settings.quantize_base, blocks_to_swap=settings.blocks_to_swap,
        )  # fmt: skip
        difflora.train(config, progress=False)
        row.estimate_gib = planned_peak_gib(out / f"{name}.run")
        if torch.cuda.is_available():
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.step_seconds = median_step_seconds(out / f"{name}.run", args.warmup)
        row.tflops, row.mfu = mfu(row.step_flops, row.step_seconds, args.peak)
    except Exception as error:  # one configuration failing must not hide the others' figures
        row.status = one_line(error)
    finally:
        _free_memory()
    return row, out / f"{name}.safetensors"


def generate_row(base: Base, adapters: Sequence[Path], args: argparse.Namespace) -> GenerateRow:
    """Seconds per image of the base alone and with the two adapters fused (`a:1,b:0.5`)."""
    import torch

    import difflora

    row = GenerateRow(base.label, base.resolution, args.gen_steps)
    try:
        adapters = adapters[:2]  # the first two settings' (Flux's swap row is refused off CUDA)
        missing = [path.name for path in adapters if not path.is_file()]
        if missing:
            raise RuntimeError(f"no adapter to compose: training {', '.join(missing)} failed")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        pipe = difflora.load_pipeline(base.folder, dtype=dtype, device=device)
        spec = f"{adapters[0].stem}:1,{adapters[1].stem}:0.5"
        folders = [adapters[0].parent]
        row.base_seconds = _seconds_per_image(pipe, [], folders, base, args)
        row.fused_seconds = _seconds_per_image(
            pipe, difflora.parse_adapter_weights(spec), folders, base, args
        )
        del pipe
    except Exception as error:
        row.status = one_line(error)
    finally:
        _free_memory()
    return row


def _seconds_per_image(pipe, weights, folders: list[Path], base: Base, args: argparse.Namespace) -> float:
    import difflora

    difflora.compose(pipe, weights, adapter_dirs=folders)
    size = {"width": base.resolution, "height": base.resolution, "steps": args.gen_steps}
    difflora.render(pipe, [PROMPT], seeds=[0], **size)  # warm-up: kernels chosen, caches filled
    _synchronize()
    began = time.perf_counter()
    difflora.render(pipe, [PROMPT] * args.images, seeds=list(range(args.images)), **size)
    _synchronize()
    return (time.perf_counter() - began) / args.images


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bases_of(args: argparse.Namespace, work: Path) -> list[Base]:
    """The bases asked for: random full-size weights, or in a dry run the embedded models (the tiny SD for
    the SD bases, the tiny Flux for flux)."""
    if args.dry_run:
        from difflora.embedded import EMBEDDED_MODEL_DIR

        tiny = {"flux": lambda: Base("tiny-flux", EMBEDDED_MODEL_DIR.parent / "flux", 64, transformer=True)}
        # no tiny Chroma or Qwen-Image is embedded: each is built once (Chroma from the tiny Flux's parts)
        tiny["chroma"] = lambda: Base("tiny-chroma", tiny_chroma(work), 64, transformer=True)
        tiny["qwen-image"] = lambda: Base("tiny-qwen-image", tiny_qwen_image(work / "models"), 64, True)
        for name in ("sd35-large", "sd35-medium"):  # a reduced SD3.5 (medium: with MMDiT-X's attn2)
            tiny[name] = lambda name=name: Base(f"tiny-{name}", tiny_sd35(work / "models", name), 64, True)
        embedded = Base("embedded", None, 64)
        return list({tiny[name]() if name in tiny else embedded: None for name in args.bases})
    import torch

    models = Path(args.models_dir or work / "models")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Flux's, Chroma's, Qwen-Image's and SD3.5's published weights are bf16 (fp16 overflows in their blocks)
    kinds = {name: torch.bfloat16 if name in TRANSFORMERS else torch.float16 for name in args.bases}
    folders = {name: random_base(name, models, dtype=kind, device=device) for name, kind in kinds.items()}
    return [
        Base(name, folder, BASES[name], transformer=name in TRANSFORMERS) for name, folder in folders.items()
    ]


def run(args: argparse.Namespace, work: Path) -> Report:
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else "CPU (no GPU: float32, MFU left blank)"
    args.precision = "bf16" if gpu else "no"  # bf16 on a CPU without bf16 units is emulated: minutes
    args.peak = args.peak_tflops or (peak_tflops(device) if gpu else None)
    report = Report(device + (f", {args.peak:g} bf16 TFLOP/s peak" if args.peak else ""))
    for base in bases_of(args, work):
        adapters, flops = [], flops_of(base)
        for settings in settings_of(args, base):
            row, adapter = train_row(base, settings, flops, work, args)
            report.train.append(row)
            adapters.append(adapter)
        report.generate.append(generate_row(base, adapters, args))
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, the embedded model, 2 steps")
    parser.add_argument(
        "--bases",
        nargs="+",
        choices=list(BASES),
        default=None,
        help="default: sd15 sdxl flux chroma (qwen-image alone; sd35-large sd35-medium alone)",
    )
    parser.add_argument("--compile", action="store_true", help="the fast settings also use --compile")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 12; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the median (4; 1)")
    parser.add_argument("--gen-steps", type=int, default=None, help="sampling steps (default 20; 2)")
    parser.add_argument("--images", type=int, default=None, help="timed images per case (default 3; 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 peak, for MFU")
    parser.add_argument("--models-dir", default=None, help="where the random bases are written and reused")
    parser.add_argument("--out", default=None, help="also write the Markdown tables here")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.bases = args.bases or (
        ["sd15"] if dry else list(DEFAULT_BASES)
    )  # the dry run's default: the tiny SD alone
    args.swap_limit = 3 if dry else SWAP  # the tiny Flux, Chroma and SD3.5 have 4 blocks
    args.steps = args.steps or (2 if dry else 12 + 4 * args.compile)  # compiling makes the first steps slow
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 4 + 4 * args.compile)
    args.gen_steps = args.gen_steps or (2 if dry else 20)
    args.images = args.images or (1 if dry else 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; a GPU machine may have no network
    with tempfile.TemporaryDirectory(prefix="difflora-gpu-check-") as work:
        report = run(args, Path(work))
    table = report.markdown()
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
