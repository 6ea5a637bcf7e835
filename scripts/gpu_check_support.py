"""What scripts/gpu_check.py measures with: FLOPs of a training step counted on the meta device, the peak
throughput of known GPUs, the step times a run logged, a small image folder, and the Markdown tables."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (no sparsity). Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("4090", 165.2),
    ("A10G", 70.0),
)

TRAIN_COLUMNS = (
    "model",
    "px",
    "settings",
    "step s (median)",
    "peak GiB",
    "GFLOP/step",
    "TFLOP/s",
    "MFU",
    "status",
)
GENERATE_COLUMNS = ("model", "px", "steps", "base s/image", "fused s/image (2 adapters)", "status")


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of the GPU called `device_name`, or None when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


@dataclass
class TrainRow:
    model: str
    px: int
    settings: str
    step_seconds: float | None = None
    peak_gib: float | None = None
    estimate_gib: float | None = None  # the training plan's estimated peak (in the JSON figures)
    forward_flops: int | None = None
    step_flops: int | None = None
    tflops: float | None = None
    mfu: float | None = None
    status: str = "ok"

    def cells(self) -> list[str]:
        return [self.model, str(self.px), self.settings, _number(self.step_seconds, "{:.3f}"),
                _number(self.peak_gib, "{:.2f}"), _number(self.step_flops and self.step_flops / 1e9, "{:.1f}"),
                _number(self.tflops, "{:.1f}" if (self.tflops or 0) >= 10 else "{:.3g}"), _number(self.mfu and 100 * self.mfu, "{:.1f}%"), self.status]  # fmt: skip


@dataclass
class GenerateRow:
    model: str
    px: int
    steps: int
    base_seconds: float | None = None
    fused_seconds: float | None = None
    status: str = "ok"

    def cells(self) -> list[str]:
        seconds = (_number(self.base_seconds, "{:.3f}"), _number(self.fused_seconds, "{:.3f}"))
        return [self.model, str(self.px), str(self.steps), *seconds, self.status]


@dataclass
class Report:
    device: str
    train: list[TrainRow] = field(default_factory=list)
    generate: list[GenerateRow] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(row.status != "ok" for row in [*self.train, *self.generate])

    def markdown(self) -> str:
        lines = [f"Device: {self.device}", "", "Training (batch 1, LoRA rank 16 on attention):", ""]
        lines += _table(TRAIN_COLUMNS, [row.cells() for row in self.train])
        lines += ["", "Generation (one image per call):", ""]
        lines += _table(GENERATE_COLUMNS, [row.cells() for row in self.generate])
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        rows = {"train": [vars(r) for r in self.train], "generate": [vars(r) for r in self.generate]}
        return json.dumps({"device": self.device, **rows}, indent=2)


def _number(value: float | None, form: str) -> str:
    return "" if value is None else form.format(value)


def _table(columns: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def one_line(error: BaseException) -> str:
    """The error as one table cell: its type and first line, without pipes."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"failed: {type(error).__name__}: {text}"[:200].replace("|", "/")


def planned_peak_gib(run_dir: Path) -> float:
    """The estimated peak memory the run's plan printed ("est. peak 12.34 GiB" or "... 56.7 MiB"), in GiB."""
    line = next(x for x in (run_dir / "plan.txt").read_text().splitlines() if "est. peak " in x)
    value, unit = line.split("est. peak ")[1].split()[:2]
    return float(value) / (1024 if unit == "MiB" else 1)


def median_step_seconds(run_dir: Path, warmup: int) -> float:
    """The median of the steps the run logged (loss.csv) after its first `warmup` steps."""
    with open(run_dir / "loss.csv", newline="") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return statistics.median(seconds[warmup:] or seconds)


def write_images(folder: Path, resolution: int, count: int = 4) -> Path:
    """`count` noise images of `resolution` px with a caption each: a training step costs the same on any
    pixels, and the latents are cached once."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a red circle on a white background")
    return folder


def unet_flops(
    model_dir: Path, resolution: int, *, rank: int, targets: Sequence[str], backward: bool = True
) -> int:
    """FLOPs of one batch-1 UNet pass at `resolution` px with LoRA (`rank` on `targets`), forward alone or
    forward + backward (the training step: the base frozen, gradients for the LoRA weights). Counted by
    torch.utils.flop_counter on the meta device, so a full-size model costs no memory and no time. These are
    model FLOPs: what gradient checkpointing recomputes is not counted, as MFU conventionally does."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(model_dir / "unet")
    tokens = json.loads((model_dir / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
        inputs = _unet_inputs(config, resolution // _vae_step(model_dir), tokens)
        with FlopCounterMode(display=False) as counter:
            output = unet(**inputs).sample
            if backward:
                output.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def transformer_flops(
    model_dir: Path, resolution: int, *, rank: int, targets: Sequence[str], backward: bool = True
) -> int:
    """`unet_flops` for a Flux-style transformer (Flux.1, Chroma): one batch-1 pass over the packed latents
    (2x2 latent pixels per token) and T5's full padded length, with the pooled CLIP input and dev's guidance
    input where the model takes them (Chroma takes neither), counted on the meta device."""
    import diffusers
    import torch
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    if config["_class_name"] == "QwenImageTransformer2DModel":
        return qwen_flops(model_dir, resolution, rank=rank, targets=targets, backward=backward)
    if config["_class_name"] == "SD3Transformer2DModel":
        return sd3_flops(model_dir, resolution, rank=rank, targets=targets, backward=backward)
    model_class = getattr(diffusers, config["_class_name"])
    t5_folder = "tokenizer_2" if (model_dir / "tokenizer_2").is_dir() else "tokenizer"  # Chroma: T5 alone
    t5 = json.loads((model_dir / t5_folder / "tokenizer_config.json").read_text())["model_max_length"]
    tokens = (resolution // _vae_step(model_dir) // 2) ** 2
    with torch.device("meta"):
        model = model_class.from_config(config).requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
        inputs = {
            "hidden_states": torch.randn(1, tokens, config["in_channels"]),
            "encoder_hidden_states": torch.randn(1, t5, config["joint_attention_dim"]),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(t5, 3),
        }
        if "pooled_projection_dim" in config:
            inputs["pooled_projections"] = torch.randn(1, config["pooled_projection_dim"])
            inputs["guidance"] = torch.tensor([1.0]) if config.get("guidance_embeds") else None
        with FlopCounterMode(display=False) as counter:
            output = model(**inputs, return_dict=False)[0]
            if backward:
                output.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def qwen_flops(
    model_dir: Path, resolution: int, *, rank: int, targets: Sequence[str], backward: bool = True
) -> int:
    """`transformer_flops` for Qwen-Image: the packed latents (2x2 latent pixels per token of its 8x
    autoencoder) and the 512 text tokens difflora's cached embeddings are padded to (masked), σ as timestep."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from difflora.models.families.qwen_image import TEXT_TOKENS

    config = QwenImageTransformer2DModel.load_config(model_dir / "transformer")
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    side = resolution // 2 ** len(vae["temperal_downsample"]) // 2
    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config(config).requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
        inputs = {
            "hidden_states": torch.randn(1, side * side, config["in_channels"]),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"]),
            "encoder_hidden_states_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long),
            "timestep": torch.tensor([0.5]),
            "img_shapes": [[(1, side, side)]],
        }
        with FlopCounterMode(display=False) as counter:
            output = model(**inputs, return_dict=False)[0]
            if backward:
                output.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def sd3_flops(
    model_dir: Path, resolution: int, *, rank: int, targets: Sequence[str], backward: bool = True
) -> int:
    """`transformer_flops` for SD3 / SD3.5: the latent image (patched inside the model) and the sequence the
    family caches: 77 CLIP tokens then T5's (the pipeline's 256, or the tokenizer's length where shorter)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from difflora.models.families.sd3 import T5_TOKENS

    config = SD3Transformer2DModel.load_config(model_dir / "transformer")
    t5 = json.loads((model_dir / "tokenizer_3" / "tokenizer_config.json").read_text())["model_max_length"]
    side = resolution // _vae_step(model_dir)
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config).requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
        inputs = {
            "hidden_states": torch.randn(1, config["in_channels"], side, side),
            "encoder_hidden_states": torch.randn(1, 77 + min(T5_TOKENS, t5), config["joint_attention_dim"]),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"]),
            "timestep": torch.tensor([500.0]),
        }
        with FlopCounterMode(display=False) as counter:
            output = model(**inputs, return_dict=False)[0]
            if backward:
                output.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def _vae_step(model_dir: Path) -> int:
    """Pixels per latent: 2 ** (number of VAE levels - 1), 8 for every Stable Diffusion VAE."""
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def _unet_inputs(config: dict, size: int, tokens: int) -> dict:
    import torch

    inputs = {
        "sample": torch.randn(1, config["in_channels"], size, size),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, tokens, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and 6 size/crop time ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.zeros(1, 6)}
    return inputs


def mfu(flops: int, seconds: float, peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s, MFU as a fraction or None without a peak)."""
    achieved = flops / seconds / 1e12
    return achieved, (achieved / peak if peak and math.isfinite(achieved) else None)
