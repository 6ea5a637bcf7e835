"""A LoKr, a LoHa (with a full module beside it) and a LoRA compose in one `difflora generate` call on the
embedded model, and the weights the image is rendered with are W0 + Σ wᵢ·ΔWᵢ from the kept W0, every ΔWᵢ
computed from the files' tensors by the published formulas (tests/support/lycoris.py), not by difflora."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import difflora.generation.generate as generate_module
from difflora.cli import cli
from difflora.config.spec import parse_adapter_weights
from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.models.loading import load_pipeline
from tests.support.adapters import module_of
from tests.support.lycoris import expected_delta, full_tensors, loha_tensors, lokr_tensors

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
CONV = "unet.down_blocks.0.resnets.0.conv1"
K = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {Q: (64, 64), OUT: (64, 64), CONV: (64, 64, 3, 3), K: (128, 128), TE: (128, 128)}
SPEC = "lokr:0.7:0.4,loha:-0.5,lora:1.2"


def kohya(key: str) -> str:
    component, _, path = key.partition(".")
    prefix = "lora_unet" if component == "unet" else "lora_te"
    return f"{prefix}_{path.replace('.', '_')}"


def lora_tensors(key: str, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, cols = SHAPES[key][0], SHAPES[key][1]
    return {
        f"{kohya(key)}.lora_down.weight": torch.randn(rank, cols, generator=g) * 0.1,
        f"{kohya(key)}.lora_up.weight": torch.randn(out, rank, generator=g) * 0.1,
        f"{kohya(key)}.alpha": torch.tensor(alpha),
    }


def lora_delta(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    name = kohya(key)
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "lokr": lokr_tensors(kohya(Q), SHAPES[Q], layout="lowrank-lowrank", seed=1)
        | lokr_tensors(kohya(CONV), SHAPES[CONV], layout="tucker", seed=2)
        | lokr_tensors(kohya(TE), SHAPES[TE], layout="full-lowrank", seed=3),
        "loha": loha_tensors(kohya(Q), SHAPES[Q], seed=4)
        | loha_tensors(kohya(CONV), SHAPES[CONV], tucker=True, seed=5)
        | full_tensors(kohya(OUT), SHAPES[OUT], bias=True, seed=6),
        "lora": lora_tensors(Q, 4, 2.0, 7) | lora_tensors(K, 2, 8.0, 8) | lora_tensors(TE, 4, 4.0, 9),
    }


def expected(
    base: dict[str, torch.Tensor], files: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """module (or module + ".bias") -> W0 + Σ wᵢ ΔWᵢ in float64."""
    result = {key: value.double().clone() for key, value in base.items()}
    for spec in parse_adapter_weights(SPEC):
        tensors = files[spec.name]
        for key, shape in SHAPES.items():
            weight = spec.weight if key.startswith("unet.") else spec.text_encoder_weight
            if f"{kohya(key)}.lora_down.weight" in tensors:
                result[key] += weight * lora_delta(tensors, key)
            elif any(k.startswith(kohya(key) + ".") for k in tensors):
                result[key] += weight * expected_delta(tensors, kohya(key), shape)
            if f"{kohya(key)}.diff_b" in tensors:
                result[key + ".bias"] += weight * tensors[f"{kohya(key)}.diff_b"].double()
    return result


def weights_of(pipe) -> dict[str, torch.Tensor]:
    found = {key: module_of(pipe, key).weight.detach().clone() for key in SHAPES}
    return found | {OUT + ".bias": module_of(pipe, OUT).bias.detach().clone()}


@pytest.mark.slow  # end to end on the embedded model (~25 s on this machine)
def test_lokr_loha_and_lora_compose_exactly_in_one_generate_call(tmp_path, files, monkeypatch):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name, tensors in files.items():
        save_file(tensors, adapters / f"{name}.safetensors")
    seen: dict[str, torch.Tensor] = {}
    render = generate_module.render

    def recording_render(pipe, *args, **kwargs):
        seen.update(weights_of(pipe))  # the weights the image is rendered with
        return render(pipe, *args, **kwargs)

    monkeypatch.setattr(generate_module, "render", recording_render)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "generate", "a red circle", "--model", str(EMBEDDED_MODEL_DIR), "--adapter-dir", str(adapters),
        "--adapters", SPEC, "--steps", "1", "--seed", "3", "--report", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    want = expected(weights_of(load_pipeline(EMBEDDED_MODEL_DIR, device="cpu")), files)
    assert set(seen) == set(want)
    for key, value in want.items():
        assert torch.allclose(seen[key].double(), value, rtol=1e-5, atol=1e-6), key
    report = (out / "composition-report.txt").read_text()
    assert all(name in report for name in ("lokr", "loha", "lora"))


def test_dynamic_composition_refuses_lycoris_in_one_line(tmp_path, files):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    save_file(files["loha"], adapters / "loha.safetensors")
    result = CliRunner().invoke(cli, [
        "generate", "x", "--model", str(EMBEDDED_MODEL_DIR), "--adapter-dir", str(adapters), "--adapters",
        "loha:1", "--no-fuse", "--steps", "1", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert result.exit_code != 0
    assert "LoHa/full modules, which dynamic composition" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_lycoris_module_that_does_not_fit_is_refused_naming_it(tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    save_file(lokr_tensors(kohya(Q), (64, 128), layout="full-full"), adapters / "wide.safetensors")
    result = CliRunner().invoke(cli, [
        "generate", "x", "--model", str(EMBEDDED_MODEL_DIR), "--adapter-dir", str(adapters), "--adapters",
        "wide:1", "--steps", "1", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert result.exit_code != 0
    assert "attn1.to_q: adapter 128->64, model 64->64" in result.output
