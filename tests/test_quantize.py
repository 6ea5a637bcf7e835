"""--quantize-base int8|nf4 on the embedded model: the frozen base really is held in bitsandbytes' 8-bit and
4-bit layers (types, dtypes, bytes measured against the float32 base), it computes nearly what the float32
base does (UNet output and the first step's loss), the LoRA weights train on top of it, and the adapter is an
ordinary one for the unquantized base: its base hash is the float32 base's, it loads, generates on the
unquantized base without a warning, and its export's ΔW equals alpha/rank · B @ A computed here from the
checkpoint's raw parameters. A missing bitsandbytes is a one-line error saying how to install it."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from torch import nn

import difflora.training.setup as setup
from difflora.adapter.spec import LoraSpec
from difflora.cli import cli
from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.formats.export import export_adapter
from difflora.formats.read import load_adapter
from difflora.generation.generate import generate
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from difflora.models.quantize import quantize_base
from difflora.training.checkpoint import latest_checkpoint, load_checkpoint
from difflora.training.setup import load_models
from difflora.training.trainer import train
from tests.support.paths import SAMPLE_DATA
from tests.support.variants import ALPHA, ATTENTION, RANK, variant_config

BNB_LAYERS = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def _train(out: Path, cache_dir: Path, **changes) -> Path:
    sampled = dict(  # a sample grid (eval mode, no grad) between the training steps
        sample_every=1,
        sample_steps=2,
        sample_prompts=("a red circle, zebrastripes style",),
        sample_seeds=(1,),
    )
    return train(variant_config(out, cache_dir, **(sampled | changes)), progress=False)


def _first_loss(adapter_path: Path) -> float:
    """The loss of step 1, logged before any update (B is zero, so only the base's weights matter)."""
    with open(adapter_path.with_suffix(".run") / "loss.csv", newline="") as handle:
        return float(next(csv.DictReader(handle))["loss"])


@pytest.fixture(scope="module")
def plain(tmp_path_factory, sample_cache) -> Path:
    return _train(tmp_path_factory.mktemp("plain"), sample_cache)


# int8 also trains the (quantized) text encoder's LoRA, nf4 the UNet's alone.
@pytest.fixture(scope="module", params=["int8", "nf4"])
def quantized(request, tmp_path_factory, sample_cache) -> tuple[str, Path]:
    kind = request.param
    out = tmp_path_factory.mktemp(kind)
    return kind, _train(out, sample_cache, quantize_base=kind, train_text_encoder=kind == "int8")


@pytest.mark.slow
def test_the_first_loss_is_close_to_the_unquantized_bases(quantized, plain):
    kind, path = quantized
    # Same seed: same images, noise and timesteps; the difference is the quantization error alone.
    # Measured: 0.04% (int8) and 0.2% (nf4) from the float32 base's 0.534.
    tolerance = {"int8": 0.005, "nf4": 0.02}[kind]
    assert _first_loss(path) == pytest.approx(_first_loss(plain), rel=tolerance)


@pytest.mark.slow
def test_lora_trains_and_the_adapter_is_for_the_unquantized_base(quantized, tmp_path, caplog):
    kind, path = quantized
    parameters = load_checkpoint(latest_checkpoint(path.with_suffix(".run") / "checkpoints")).parameters
    ups = {key: p for key, p in parameters.items() if ".lora_B." in key}
    components = {key.split(".")[0] for key in ups}
    assert components == ({"unet", "text_encoder"} if kind == "int8" else {"unet"})
    assert all(p.dtype == torch.float32 and p.abs().max() > 0 for p in ups.values())  # B moved from zero

    adapter = load_adapter(path)
    assert adapter.meta.extra["difflora.train.quantize_base"] == kind
    assert adapter.meta.base_hash == model_identity(load_pipeline(None)).base_hash  # the float32 base's
    assert all(w.down.dtype == torch.float32 for w in adapter.modules.values())
    assert f"quantized   {kind} through bitsandbytes" in (path.with_suffix(".run") / "plan.txt").read_text()

    with caplog.at_level(logging.WARNING, logger="difflora"):
        settings = GenerateConfig(
            prompt="a red circle, zebrastripes style", adapters=(f"{path}:1",), steps=2, seed=1,
            out=str(tmp_path / "images"),
        )  # fmt: skip
        image = np.asarray(Image.open(generate(settings)[0]))
    assert image.shape == (64, 64, 3)
    assert not [r for r in caplog.records if "base hash" in r.getMessage()]

    exported = export_adapter(
        ExportConfig(adapter=str(path), output=str(tmp_path / "export.safetensors"), dtype="fp32")
    )
    with safe_open(str(exported), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}  # noqa: SIM118
    for key, down in parameters.items():
        if ".lora_A." not in key:
            continue
        component, _, module = key.split(".lora_A.")[0].partition(".")
        up = parameters[key.replace(".lora_A.", ".lora_B.")]
        # Files name CLIP's layers under text_model., as transformers 4 did.
        if component == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = KOHYA_PREFIXES[component] + module.replace(".", "_")
        found = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
        found = float(tensors[f"{name}.alpha"]) / RANK * found
        torch.testing.assert_close(found, ALPHA / RANK * (up @ down), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bf16_training_with_previews_between_steps(kind, tmp_path, sample_cache):
    """Under bf16 autocast the prepared UNet answers in float32, which the next preview step feeds back."""
    path = _train(tmp_path, sample_cache, quantize_base=kind, mixed_precision="bf16")
    parameters = load_checkpoint(latest_checkpoint(path.with_suffix(".run") / "checkpoints")).parameters
    ups = [p for key, p in parameters.items() if ".lora_B." in key]
    assert ups and all(p.dtype == torch.float32 and p.abs().max() > 0 for p in ups)
    assert len(list((path.with_suffix(".run") / "samples").glob("*.png"))) == 2


def _models(kind: str):
    return load_models(
        None, device=torch.device("cpu"), mixed_precision="no",
        lora=lambda family: LoraSpec(rank=RANK, alpha=ALPHA, unet_targets=ATTENTION),
        train_text_encoder=False, gradient_checkpointing=False, seed=0, quantization=kind,
    )  # fmt: skip


def _base_bytes(module: nn.Module) -> int:
    """Bytes of the base's tensors as the module's state dict holds them (LoRA layers left out); for
    bitsandbytes' 4-bit layers that includes the block scales."""
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if ".lora_" not in k)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_the_base_is_held_quantized_and_smaller(kind):
    plain, quantized = load_pipeline(None).unet, _models(kind).pipe.unet  # the float32 base, and with LoRA
    linears = {name: m for name, m in plain.named_modules() if type(m) is nn.Linear}
    layers = dict(quantized.named_modules())
    for name, linear in linears.items():
        base = layers[name].get_base_layer() if hasattr(layers[name], "get_base_layer") else layers[name]
        assert type(base) is BNB_LAYERS[kind], name
        if kind == "int8":
            assert base.weight.dtype == torch.int8 and base.weight.shape == linear.weight.shape
        else:  # two 4-bit codes per byte
            assert base.weight.dtype == torch.uint8 and base.weight.numel() * 2 == linear.weight.numel()
            assert base.weight.quant_state.quant_type == "nf4"
    # float32 weights take 4 bytes; int8 1 (plus a float32 scale per row), nf4 half a byte (plus scales).
    weights = sum(m.weight.numel() for m in linears.values())
    saved_per_weight = {"int8": 2.9, "nf4": 3.4}[kind]
    assert _base_bytes(quantized) <= _base_bytes(plain) - saved_per_weight * weights

    torch.manual_seed(0)
    latents, steps, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 128)
    with torch.no_grad():
        reference, found = plain(latents, steps, text).sample, quantized(latents, steps, text).sample
    error = ((found - reference).norm() / reference.norm()).item()
    assert error < {"int8": 0.01, "nf4": 0.05}[kind]


def test_quantizing_again_leaves_quantized_layers_and_lora_alone():
    """A base reused by the next adapter of a multi-folder run, or one already carrying LoRA layers."""
    unet = _models("int8").pipe.unet
    before = {name: m for name, m in unet.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    again = quantize_base({"unet": unet}, "int8", device=torch.device("cpu"), compute_dtype=torch.float32)
    after = {name: m for name, m in unet.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert again.layers == {"unet": len(before)} and after.keys() == before.keys()
    assert all(after[name] is layer for name, layer in before.items())
    lora = [m for name, m in unet.named_modules() if ".lora_" in name and isinstance(m, nn.Linear)]
    assert lora and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in lora)
    assert all(m.weight.requires_grad for m in lora)


def test_a_missing_bitsandbytes_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing backend was reported")

    monkeypatch.setattr(setup, "load_pipeline", no_loading)
    with pytest.raises(ConfigError, match=r"--quantize-base nf4 .* pip install 'difflora\[quantize\]'"):
        _train(tmp_path, tmp_path / "cache", quantize_base="nf4")
    out = str(tmp_path / "cli")
    data = str(SAMPLE_DATA / "style")
    result = CliRunner().invoke(cli, ["train", data, "--quantize-base", "int8", "--output-dir", out])
    assert result.exit_code == ConfigError.exit_code
    assert "pip install 'difflora[quantize]'" in result.output and "Traceback" not in result.output


def test_an_unknown_format_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="--quantize-base: must be one of int8, nf4"):
        TrainConfig(data_dir="images", quantize_base="int4")


def test_dora_on_a_quantized_base_is_refused_before_anything_loads():
    with pytest.raises(ConfigError, match="--dora: cannot be combined with --quantize-base"):
        TrainConfig(data_dir="images", quantize_base="int8", dora=True)
