"""scripts/gpu_check.py --dry-run: the GPU check's own code, on the CPU with the embedded model, so it cannot
rot before a GPU runs it. Its table has the rows and columns BENCHMARKS.md takes, and its FLOP count agrees
with one made here independently: 2 x the multiply-adds of every linear and convolution layer the UNet runs,
plus the two matrix products of every attention (scores and weighted values)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from tests.support.paths import REPO_ROOT

TRAIN_COLUMNS = ["model", "px", "settings", "step s (median)", "peak GiB", "GFLOP/step", "TFLOP/s", "MFU",
                 "status"]  # fmt: skip
GENERATE_COLUMNS = ["model", "px", "steps", "base s/image", "fused s/image (2 adapters)", "status"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def gpu_check():
    """scripts/gpu_check.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(gpu_check, tmp_path_factory) -> tuple[int, str, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    code = gpu_check.main(["--dry-run", "--out", str(out / "table.md"), "--json", str(out / "figures.json")])
    return code, (out / "table.md").read_text(), json.loads((out / "figures.json").read_text())


def _tables(markdown: str) -> list[list[list[str]]]:
    """Each Markdown table as rows of cells, header first, the |---| line left out."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous = line
    return tables


@pytest.mark.slow  # the module's dry run: the embedded model trained two ways and sampled (~15 s)
def test_the_dry_run_reports_both_settings_and_the_composed_generation(dry_run):
    code, markdown, _ = dry_run
    assert code == 0, markdown
    train, generate = _tables(markdown)
    assert train[0] == TRAIN_COLUMNS and generate[0] == GENERATE_COLUMNS
    rows = [dict(zip(TRAIN_COLUMNS, row, strict=True)) for row in train[1:]]
    assert [(r["model"], r["px"], r["settings"]) for r in rows] == [
        ("embedded", "64", "fp32, checkpointing"),
        ("embedded", "64", "fp32"),
    ]
    for row in rows:
        assert row["status"] == "ok" and float(row["step s (median)"]) > 0 and float(row["TFLOP/s"]) > 0
        assert row["peak GiB"] == "" and row["MFU"] == ""  # no GPU: nothing to measure them against
    (generated,) = [dict(zip(GENERATE_COLUMNS, row, strict=True)) for row in generate[1:]]
    assert generated["status"] == "ok" and generated["steps"] == "2"
    assert float(generated["base s/image"]) > 0 and float(generated["fused s/image (2 adapters)"]) > 0


@pytest.mark.slow  # the module's dry run: the embedded model trained two ways and sampled (~15 s)
def test_the_flop_count_matches_one_made_independently(dry_run):
    _, _, figures = dry_run
    forward, step = figures["train"][0]["forward_flops"], figures["train"][0]["step_flops"]
    expected = _forward_flops_by_hand()
    assert forward == pytest.approx(expected, rel=0.01)
    # backward through a frozen base: the input gradients cost about a forward; the LoRA weights' little
    assert 1.8 * forward < step < 3 * forward


def _forward_flops_by_hand() -> float:
    """The embedded UNet with rank-16 LoRA on its attention, run at 64 px on the CPU, its layers counted."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig

    from difflora.embedded import EMBEDDED_MODEL_DIR

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(EMBEDDED_MODEL_DIR / "unet"))
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=ATTENTION))
    tokens = json.loads((EMBEDDED_MODEL_DIR / "text_encoder" / "config.json").read_text())
    total = [0.0]

    def layer(module: nn.Module, inputs, output) -> None:
        per_output = module.in_features if isinstance(module, nn.Linear) else module.weight[0].numel()
        total[0] += 2 * output.numel() * per_output

    def attention(module: Attention, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states")
        keys = (context if context is not None else hidden).shape[1]
        batch, queries, _ = hidden.shape
        total[0] += 2 * 2 * batch * queries * keys * module.inner_dim  # Q·Kᵀ, then softmax · V

    for module in unet.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.register_forward_hook(layer)
        elif isinstance(module, Attention):
            module.register_forward_pre_hook(attention, with_kwargs=True)
    context = torch.randn(1, tokens["max_position_embeddings"], unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(
            torch.randn(1, 4, 16, 16), torch.tensor([500]), encoder_hidden_states=context
        )  # 64 px: 16x16 latents
    return total[0]


def test_a_failed_configuration_is_one_row_among_the_others_and_fails_the_check(gpu_check):
    report = gpu_check.Report("GPU")
    report.train.append(gpu_check.TrainRow("sd15", 512, "bf16", step_seconds=0.5, step_flops=2 * 10**12))
    error = RuntimeError("CUDA out of memory. Tried to allocate 2 GiB | more\ndetails")
    report.train.append(gpu_check.TrainRow("sdxl", 1024, "bf16", status=gpu_check.one_line(error)))
    assert not gpu_check.Report("GPU", train=report.train[:1]).failed and report.failed
    rows = _tables(report.markdown())[0]
    assert [row[-1] for row in rows[1:]] == [
        "ok",
        "failed: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB / more",
    ]
    assert rows[1][TRAIN_COLUMNS.index("GFLOP/step")] == "2000.0"


def test_the_peak_is_looked_up_by_gpu_name(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert gpu_check.peak_tflops("Some Future GPU") is None  # then --peak-tflops gives it


@pytest.mark.slow  # ~50 s: a tiny DiT trained three ways and sampled
def test_the_flux_dry_run_trains_the_tiny_flux_and_refuses_the_swap_off_cuda(gpu_check, tmp_path) -> None:
    """The Flux rows on the tiny Flux: bf16 (float32 on the CPU) and fp8 + checkpointing train; the block-swap
    row goes through the same code to the trainer, which refuses --blocks-to-swap without CUDA in one line, so
    the check fails (exit 1) with that row's status; generation composes the first two adapters."""
    code = gpu_check.main(["--dry-run", "--bases", "flux", "--json", str(tmp_path / "figures.json")])
    figures = json.loads((tmp_path / "figures.json").read_text())
    rows = [(r["model"], r["settings"], r["status"]) for r in figures["train"]]
    refusal = "failed: ConfigError: --blocks-to-swap needs a CUDA GPU (it moves blocks into GPU memory); leave it out here."
    assert rows == [
        ("tiny-flux", "fp32", "ok"),
        ("tiny-flux", "fp8, checkpointing", "ok"),
        ("tiny-flux", "fp8, checkpointing, swap 3", refusal),
    ]
    assert code == 1
    for row in figures["train"][:2]:
        assert (
            row["step_seconds"] > 0
            and row["estimate_gib"] > 0
            and row["step_flops"] > row["forward_flops"] > 0
        )
    assert figures["generate"][0]["status"] == "ok" and figures["generate"][0]["fused_seconds"] > 0


@pytest.mark.slow  # ~50 s: a tiny DiT trained three ways and sampled
def test_the_chroma_dry_run_trains_a_tiny_chroma_with_the_flux_rows(gpu_check, tmp_path) -> None:
    """Chroma's rows are Flux's (the same transformer settings), on a tiny Chroma built from the tiny Flux's
    parts: bf16 (float32 on the CPU) and fp8 + checkpointing train, the swap row is refused off CUDA, and
    generation composes the first two adapters."""
    code = gpu_check.main(["--dry-run", "--bases", "chroma", "--json", str(tmp_path / "figures.json")])
    figures = json.loads((tmp_path / "figures.json").read_text())
    rows = [(r["model"], r["px"], r["settings"], r["status"]) for r in figures["train"]]
    refusal = "failed: ConfigError: --blocks-to-swap needs a CUDA GPU (it moves blocks into GPU memory); leave it out here."
    assert rows == [
        ("tiny-chroma", 64, "fp32", "ok"),
        ("tiny-chroma", 64, "fp8, checkpointing", "ok"),
        ("tiny-chroma", 64, "fp8, checkpointing, swap 3", refusal),
    ]
    assert code == 1
    for row in figures["train"][:2]:
        assert row["step_seconds"] > 0 and row["step_flops"] > row["forward_flops"] > 0
    assert figures["generate"][0]["status"] == "ok" and figures["generate"][0]["fused_seconds"] > 0
