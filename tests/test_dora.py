"""DoRA (--dora) on the embedded model: trains a few steps (attention and, through LoCon, 3x3 convolutions),
saves, loads, generates and exports. Every expected weight is computed here by hand from the checkpoint's raw
peft tensors (lora_A, lora_B, lora_magnitude_vector) and the base weight W0:

    trained:  W = m · V / ‖V‖_row,  V = W0 + (alpha/rank) · B·A        (peft: one magnitude per output row)

and compared with (a) peft's own DoRA layers holding those tensors (forward and merge), (b) what difflora's
composer applies, (c) what ComfyUI's and A1111's weight rules make of the kohya export, whose per-input-column
dora_scale cannot hold a per-row DoRA exactly: there the expected weight is the least-squares per-column fit
V·c (c_j = ⟨V[:, j], W[:, j]⟩ / ‖V[:, j]‖²), and its distance from W is the error the export reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open

from difflora.adapter.types import LoraWeights
from difflora.cli import cli
from difflora.composition.composer import compose
from difflora.composition.merge import merge_adapters
from difflora.composition.report import composition_report
from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.spec import parse_adapter_weights
from difflora.errors import AdapterCompatibilityError, AdapterFormatError, ConfigError
from difflora.formats.consumers import a1111, comfyui
from difflora.formats.dora_export import CONVERSION_KEY
from difflora.formats.export import export_adapter
from difflora.formats.read import load_adapter
from difflora.generation.generate import generate
from difflora.models.loading import load_pipeline
from difflora.training.checkpoint import latest_checkpoint, load_checkpoint
from difflora.training.trainer import train
from tests.support.paths import SAMPLE_DATA
from tests.support.variants import ALPHA, ATTENTION, RANK, variant_config

CONV_RANK, CONV_ALPHA = 2, 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_cache) -> Path:
    out = tmp_path_factory.mktemp("dora")
    config = variant_config(out, sample_cache, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA, dora=True)
    return train(config, progress=False)


@pytest.fixture(scope="module")
def base():
    return load_pipeline(None)


def _scale(module: str) -> float:
    return CONV_ALPHA / CONV_RANK if module.endswith(("conv1", "conv2")) else ALPHA / RANK


def _raw(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """live UNet module name -> its raw peft tensors (A, B, magnitude) from the final checkpoint."""
    parameters = load_checkpoint(latest_checkpoint(path.with_suffix(".run") / "checkpoints")).parameters
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in parameters.items():
        name, _, part = key.removeprefix("unet.").partition(".lora_")
        modules.setdefault(name, {})[part.split(".")[0]] = value
    return modules


def _direction(w0: torch.Tensor, raw: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    product = raw["B"].flatten(1) @ raw["A"].flatten(1)
    return w0 + scale * product.reshape(w0.shape)


def _row_weight(w0: torch.Tensor, raw: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    v = _direction(w0, raw, scale)
    norms = torch.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(dim=1))
    return v * (raw["magnitude_vector"].reshape(-1) / norms).reshape(-1, *[1] * (v.ndim - 1))


def _column_fit(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    columns, goals = v.transpose(0, 1).reshape(v.shape[1], -1), target.transpose(0, 1).reshape(v.shape[1], -1)
    c = (columns * goals).sum(dim=1) / (columns * columns).sum(dim=1)
    return v * c.reshape(1, -1, *[1] * (v.ndim - 2))


def _expected(path: Path, base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """live module name -> (W0, trained weight) for every adapted module."""
    return {
        name: (w0, _row_weight(w0, raw, _scale(name)))
        for name, raw in _raw(path).items()
        for w0 in [base.unet.get_submodule(name).weight.detach()]
    }


def _kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def test_training_moves_the_magnitudes_and_records_dora(trained, base):
    raw = _raw(trained)
    convs = [name for name in raw if name.endswith(("conv1", "conv2"))]
    assert convs and len(raw) - len(convs) == 56  # the ResNets' 3x3 convs, and 14 attention blocks x 4
    norms = {n: base.unet.get_submodule(n).weight.detach().flatten(1).norm(dim=1) for n in raw}
    # peft starts every magnitude at the base weight's row norms; two steps of training moved them
    assert all(not torch.allclose(r["magnitude_vector"].flatten(), norms[n]) for n, r in raw.items())
    adapter = load_adapter(trained)
    assert {w.magnitude_axis for w in adapter.modules.values()} == {"out"}
    assert adapter.summary()["unet"]["dora"] == "per output row"
    assert adapter.meta.extra["difflora.train.dora"] == "True"
    assert "DoRA" in (trained.with_suffix(".run") / "plan.txt").read_text()


def test_peft_layers_and_the_composer_apply_the_weight_computed_by_hand(trained, base):
    expected = _expected(trained, base)
    peft_unet = load_pipeline(None).unet  # peft's DoRA layers, built here without difflora's injection
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=[*ATTENTION, "conv1", "conv2"], use_dora=True,
        rank_pattern={"conv1": CONV_RANK, "conv2": CONV_RANK}, alpha_pattern={"conv1": CONV_ALPHA, "conv2": CONV_ALPHA},
    )  # fmt: skip
    inject_adapter_in_model(config, peft_unet)
    parameters = load_checkpoint(latest_checkpoint(trained.with_suffix(".run") / "checkpoints")).parameters
    result = peft_unet.load_state_dict(
        {k.removeprefix("unet."): v for k, v in parameters.items()}, strict=False
    )
    assert not result.unexpected_keys
    pipe = load_pipeline(None)
    composer = compose(pipe, parse_adapter_weights(str(trained)))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    h = torch.randn(1, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    t = torch.tensor([500])
    with torch.no_grad():
        trained_out, composed_out = peft_unet(x, t, h).sample, pipe.unet(x, t, h).sample
        base_out = base.unet(x, t, h).sample
    # generating with the adapter runs the trained model; and the adapter does change it
    torch.testing.assert_close(composed_out, trained_out, rtol=1e-4, atol=1e-5)
    assert (composed_out - base_out).abs().max() > 1e-3
    for name, (_, weight) in expected.items():
        torch.testing.assert_close(pipe.unet.get_submodule(name).weight, weight, rtol=1e-5, atol=1e-6)  # (b)
        layer = peft_unet.get_submodule(name)
        assert isinstance(layer, LoraLayer)
        layer.merge()
        torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=1e-5, atol=1e-6)  # (a)
    name, (w0, weight) = next(iter(expected.items()))
    composer.set_weights(parse_adapter_weights(f"{trained}:0.5"))  # ComfyUI's/A1111's strength rule
    torch.testing.assert_close(
        pipe.unet.get_submodule(name).weight, w0 + 0.5 * (weight - w0), rtol=1e-5, atol=1e-6
    )


def test_generates_an_image(trained, tmp_path):
    settings = GenerateConfig(
        prompt="a red circle, zebrastripes style", adapters=(f"{trained}:1",), steps=2, seed=1,
        out=str(tmp_path / "images"),
    )  # fmt: skip
    assert np.asarray(Image.open(generate(settings)[0])).shape == (64, 64, 3)


def test_comfyui_export_is_per_column_and_consumers_apply_the_documented_weight(trained, base, tmp_path):
    expected = _expected(trained, base)
    exported = export_adapter(
        ExportConfig(adapter=str(trained), output=str(tmp_path / "k.safetensors"), dtype="fp32")
    )
    with safe_open(str(exported), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        summary = handle.metadata()[CONVERSION_KEY]
    errors = {}
    for name, (w0, weight) in expected.items():
        parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == _kohya(name)}
        assert parts["dora_scale"].shape == (1, w0.shape[1], *((1, 1) if w0.ndim == 4 else ()))  # per column
        v = _direction(
            w0, {"A": parts["lora_down.weight"].float(), "B": parts["lora_up.weight"].float()}, _scale(name)
        )
        fit = _column_fit(v, weight)
        torch.testing.assert_close(comfyui.patched_weight(w0, parts), fit, rtol=1e-4, atol=1e-5)  # (c)
        torch.testing.assert_close(a1111.patched_weight(w0, parts), fit, rtol=1e-4, atol=1e-5)
        errors[name] = float((fit - weight).norm() / (weight - w0).norm())
    worst = max(errors, key=errors.__getitem__)
    assert f"worst {100 * errors[worst]:.2f}%" in summary and worst in summary  # the error the export reports
    assert 0.05 < errors[worst] < 1  # not exact: a per-column magnitude cannot re-scale rows
    pipe = load_pipeline(None)  # difflora reads the export back as ComfyUI applies it
    compose(pipe, parse_adapter_weights(str(exported)))
    name, (w0, weight) = next(iter(expected.items()))
    parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == _kohya(name)}
    torch.testing.assert_close(
        pipe.unet.get_submodule(name).weight, comfyui.patched_weight(w0, parts), rtol=1e-4, atol=1e-5
    )


def test_the_per_column_conversion_is_exact_when_every_row_shares_one_factor():
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=generator)
    raw = {"A": torch.randn(2, 5, generator=generator), "B": torch.randn(6, 2, generator=generator) * 0.1}
    v = _direction(w0, raw, 2.0)
    raw["magnitude_vector"] = 1.3 * v.norm(dim=1)  # m / ‖V‖_row = 1.3 on every row
    weight = _row_weight(w0, raw, 2.0)
    from difflora.adapter.dora import column_magnitude

    d = column_magnitude(w0, 2.0 * raw["B"] @ raw["A"], raw["magnitude_vector"])
    parts = {"lora_down.weight": raw["A"], "lora_up.weight": raw["B"], "alpha": torch.tensor(4.0)}
    torch.testing.assert_close(comfyui.patched_weight(w0, parts | {"dora_scale": d[None]}), weight)


def test_diffusers_export_keeps_peft_magnitudes_and_diffusers_applies_them_exactly(trained, base, tmp_path):
    expected = _expected(trained, base)
    exported = export_adapter(
        ExportConfig(
            adapter=str(trained), output=str(tmp_path / "d.safetensors"), format="diffusers", dtype="fp32"
        )
    )
    with safe_open(str(exported), framework="pt") as handle:
        magnitudes = {k: handle.get_tensor(k) for k in handle.keys() if k.endswith(".lora_magnitude_vector")}  # noqa: SIM118
    raw = _raw(trained)
    assert len(magnitudes) == len(raw)
    for name, parts in raw.items():  # peft's own shapes, float32 whatever the export dtype
        torch.testing.assert_close(
            magnitudes[f"unet.{name}.lora_magnitude_vector"], parts["magnitude_vector"]
        )
    again = load_adapter(exported)
    original = load_adapter(trained)
    assert all(
        torch.equal(again.modules[k].magnitude, w.magnitude.float()) for k, w in original.modules.items()
    )
    pipe = load_pipeline(None)
    pipe.load_lora_weights(str(exported))  # diffusers' own loader: peft DoRA layers
    for name, (_, weight) in list(expected.items())[::9]:
        layer = pipe.unet.get_submodule(name)
        layer.merge()
        torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=1e-5, atol=1e-6)


def test_composing_dora_with_another_adapter_says_how_and_is_order_free(trained, base):
    dora = load_adapter(trained)
    plain = load_adapter(trained)
    for key, weights in plain.modules.items():
        plain.modules[key] = LoraWeights(weights.down, weights.up.flip(0), weights.alpha)  # plain, elsewhere
    pipe = load_pipeline(None)
    composer = compose(pipe, ())
    composer.add(dora, 1.0, name="dora")
    composer.add(plain, 0.7, name="plain")
    assert any("DoRA is not additive" in w and "ComfyUI and A1111" in w for w in composer.warnings)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0, weight = _expected(trained, base)[name]
    other = plain.modules[f"unet.{name}"]
    expected = weight + 0.7 * ALPHA / RANK * other.up @ other.down
    torch.testing.assert_close(pipe.unet.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6)
    report = composer.report()
    text = report.text()
    assert "W = W0 + dora×1 + plain×0.7" in text and not report.unmeasured
    layer = next(layer for layer in report.layers if layer.module == f"unet.{name}")
    delta_a, delta_b = weight - w0, ALPHA / RANK * other.up @ other.down  # each at weight 1
    cosine = float((delta_a * delta_b).sum() / (delta_a.norm() * delta_b.norm()))
    assert layer.cosines[("dora", "plain")] == pytest.approx(cosine, rel=1e-4)
    swapped = load_pipeline(None)
    composer = compose(swapped, ())
    composer.add(plain, 0.7, name="plain")
    composer.add(dora, 1.0, name="dora")
    torch.testing.assert_close(swapped.unet.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6)
    # no base at hand (difflora inspect A B): DoRA layers are listed as unmeasured, not guessed
    offline = composition_report(list(zip(parse_adapter_weights("dora,plain"), [dora, plain], strict=True)))
    assert len(offline.unmeasured) == len(dora.modules)


def test_what_cannot_take_a_dora_adapter_refuses_it_clearly(trained):
    dora = load_adapter(trained)
    with pytest.raises(ConfigError, match="DoRA adapter.*fused"):
        compose(load_pipeline(None), parse_adapter_weights(str(trained)), mode="dynamic")
    with pytest.raises(AdapterCompatibilityError, match="DoRA adapters re-normalise"):
        merge_adapters(list(zip(parse_adapter_weights("a"), [dora], strict=True)))


def test_kohya_dora_scale_axis_is_read_from_its_shape(tmp_path):
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.lora_down.weight": torch.randn(2, 64), f"{name}.lora_up.weight": torch.randn(64, 2)}
    for shape, axis in (((1, 64), "in"), ((64, 1), "out")):
        save_file(tensors | {f"{name}.dora_scale": torch.rand(*shape)}, tmp_path / "a.safetensors")
        (weights,) = load_adapter(tmp_path / "a.safetensors").modules.values()
        assert weights.magnitude_axis == axis and weights.magnitude.shape == (64,)
    save_file(tensors | {f"{name}.dora_scale": torch.rand(64)}, tmp_path / "a.safetensors")
    with pytest.raises(AdapterFormatError, match=r"\[1, 64\] per input column or \[64, 1\] per output row"):
        load_adapter(tmp_path / "a.safetensors")


@pytest.mark.slow
def test_cli_trains_generates_and_exports_a_dora_adapter(tmp_path, sample_cache):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["train", str(SAMPLE_DATA / "style"), "--dora", "--max-steps", "2", "--rank", "2",
         "--output-dir", str(tmp_path), "--sample-every", "0", "--save-every", "0", "--num-threads", "1",
         "--cache-dir", str(sample_cache)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "style.safetensors"
    result = runner.invoke(
        cli,
        ["generate", "a red circle", "--adapters", f"{adapter}:1", "--steps", "2", "--seed", "1",
         "--report", "--out", str(tmp_path / "images")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "images").glob("*.png"))
    assert "DoRA is not additive" in (tmp_path / "images" / "composition-report.txt").read_text()
    result = runner.invoke(cli, ["export", str(adapter), "-o", str(tmp_path / "style.comfyui.safetensors")])
    assert result.exit_code == 0, result.output
    assert "ComfyUI: loads all" in result.output
    exported = load_adapter(tmp_path / "style.comfyui.safetensors")
    assert {w.magnitude_axis for w in exported.modules.values()} == {"in"}
    with safe_open(str(tmp_path / "style.comfyui.safetensors"), framework="pt") as handle:
        dtypes = {k.rsplit(".", 1)[-1]: handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118
    # the default fp16 export keeps magnitudes in float32: their rounding would scale the whole weight
    assert dtypes["dora_scale"] == torch.float32 and dtypes["weight"] == torch.float16
