"""Flux.1 on the family seam, on a tiny random Flux (1 double + 1 single block, 1-layer CLIP and T5 with the
real vocabularies, a 4-channel autoencoder: nothing assumes Flux's 16 channels or 19/38 blocks): detection
from BFL keys, the BFL single file with separate component files loading every weight bit for bit, the
rectified-flow objective against hand computations, training through the API and the CLI, and composition
meeting W = W0 + Σ wᵢ·ΔWᵢ with a bit-exact return to the base."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difflora.adapter.names import adaptable_modules
from difflora.composition.composer import Composer
from difflora.config.spec import parse_adapter_weights
from difflora.config.train import TrainConfig
from difflora.errors import ModelError
from difflora.generation.pipeline import render
from difflora.models.architecture import detect_architecture
from difflora.models.dit_files import ComponentFiles
from difflora.models.families import family
from difflora.models.families.flow import FlowSchedule, TimestepSampling, draw_sigmas
from difflora.models.geometry import model_geometry, pipeline_geometry
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from difflora.training.trainer import train
from tests.support.adapters import read_file_deltas
from tests.support.cli import run_cli
from tests.support.flux import tiny_flux_pipeline, write_flux_files
from tests.support.paths import copy_samples


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two images of each sample concept: enough for 2 steps, a tenth of the caching of the full folders."""
    root = tmp_path_factory.mktemp("data")
    for concept in ("style", "subject"):
        copy_samples(concept, root / concept, range(2))
    return root


@pytest.fixture(scope="module")
def adapters(flux_dir, data, tmp_path_factory) -> dict[str, Path]:
    """style: the default (attention) targets; subject: attention-mlp limited to single block 0."""
    out = tmp_path_factory.mktemp("adapters")
    return {
        "style": _train(flux_dir, out, data / "style", 3),
        "subject": _train(
            flux_dir, out, data / "subject", 4, targets="attention-mlp", blocks=("double=1-18", "single=0")
        ),
    }


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux"
    tiny_flux_pipeline(max_tokens=32).save_pretrained(folder)
    return folder


def _train(flux_dir: Path, out: Path, data: Path, seed: int, **extra) -> Path:
    config = TrainConfig(
        data_dir=str(data),
        model=str(flux_dir),
        output_dir=str(out),
        max_steps=2,
        batch_size=1,
        resolution=32,
        sample_every=0,
        grad_log_every=0,
        rank=4,
        learning_rate=5e-2,
        seed=seed,
        num_threads=2,
        **extra,
    )
    return train(config, progress=False)


# ------------------------------------------------------------------------------------------ detection


def _fake_bfl(path: Path, *, guidance: bool, prefix: str) -> Path:
    keys = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight"]
    keys += ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
    keys += ["guidance_in.in_layer.weight"] if guidance else []
    save_file({prefix + key: torch.zeros(1) for key in keys}, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "comfyui-prefix"])
def test_dev_and_schnell_are_told_apart_by_the_guidance_embedding(tmp_path, prefix):
    dev = detect_architecture(_fake_bfl(tmp_path / "dev.safetensors", guidance=True, prefix=prefix))
    schnell = detect_architecture(_fake_bfl(tmp_path / "schnell.safetensors", guidance=False, prefix=prefix))
    assert (dev.name, dev.prediction_type, dev.resolution) == ("flux", "flow_matching", 1024)
    assert (schnell.name, schnell.label) == ("flux-schnell", "Flux.1 schnell")
    incomplete = tmp_path / "partial.safetensors"
    save_file({prefix + "double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(incomplete))
    with pytest.raises(ModelError, match="Flux.1 dev transformer file.*lacks img_in.weight"):
        detect_architecture(incomplete)


def test_a_diffusers_folder_is_detected_from_its_transformer(flux_dir):
    assert detect_architecture(flux_dir).name == "flux"
    pipe = load_pipeline(flux_dir)
    identity = model_identity(pipe)
    assert (identity.family, identity.prediction_type) == ("flux", "flow_matching")
    assert family("flux").default_pixels(pipe) == 128 * 2  # FluxPipeline's 128 latent pixels, 2x autoencoder
    assert pipeline_geometry(pipe).step == 2 * 2  # buckets keep the 2x2 packing whole: 2x autoencoder x 2


# ------------------------------------------------------------------------------------------ single files


def test_a_bfl_transformer_with_separate_component_files_loads_every_weight(tmp_path):
    pipe = tiny_flux_pipeline(guidance=False, latent_channels=8, seed=3)
    paths = write_flux_files(pipe, tmp_path, prefix=True, dtype=torch.float32)
    files = ComponentFiles(clip_l=str(paths["clip_l"]), t5=str(paths["t5"]), vae=str(paths["vae"]))
    loaded = load_pipeline(paths["model"], files=files)
    assert model_identity(loaded).family == "flux-schnell"
    assert loaded.transformer.config.num_layers == 1 and loaded.vae.config.latent_channels == 8
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert set(want) == set(got), component
        for key, value in want.items():
            assert torch.equal(value, got[key]), f"{component}.{key}"
    geometry = model_geometry(str(paths["model"]))  # what `difflora check` plans with, from configs alone
    assert (geometry.resolution, geometry.step, geometry.note) == (1024, 16, None)
    with pytest.raises(ModelError, match="--clip-l FILE"):
        load_pipeline(paths["model"], files=ComponentFiles(t5=str(paths["t5"]), vae=str(paths["vae"])))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float8_e4m3fn], ids=str)
def test_a_half_or_fp8_file_loads_upcast_to_the_dtype_asked_for(tmp_path, stored):
    pipe = tiny_flux_pipeline(seed=4)
    paths = write_flux_files(pipe, tmp_path, dtype=stored)
    files = ComponentFiles(clip_l=str(paths["clip_l"]), t5=str(paths["t5"]), vae=str(paths["vae"]))
    loaded = load_pipeline(paths["model"], files=files, dtype=torch.bfloat16)
    want = pipe.transformer.state_dict()
    for key, value in loaded.transformer.state_dict().items():
        assert value.dtype == torch.bfloat16, key
        assert torch.equal(value, want[key].to(stored).to(torch.bfloat16)), key


# ------------------------------------------------------------------------------------------ flow matching


def test_flow_noising_and_target_match_the_hand_computation():
    latents = torch.randn(3, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    schedule = FlowSchedule(TimestepSampling("uniform"))
    noised = schedule.noised(latents, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)  # the same draws, in the documented order: σ, then ε
    sigma = torch.rand(3, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    for i in range(3):
        s = float(sigma[i])
        assert torch.allclose(noised.noisy[i], (1 - s) * latents[i] + s * noise[i], atol=1e-6)
    assert torch.equal(noised.timesteps, sigma) and torch.equal(noised.target, noise - latents)
    assert torch.equal(noised.weights, torch.ones(3))


def test_timestep_samplings_have_their_distributions():
    n = 20000

    def draw(kind, **kw):
        return draw_sigmas(TimestepSampling(kind, **kw), n, torch.Generator().manual_seed(0), mu=0.8)

    uniform = draw("uniform")
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.var() - 1 / 12) < 0.003
    logits = torch.logit(draw("logit-normal", mean=0.7, scale=1.4).double())
    assert abs(logits.mean() - 0.7) < 0.03 and abs(logits.std() - 1.4) < 0.03
    base = draw("sigmoid", scale=1.2).double()
    assert abs(torch.logit(base).mean()) < 0.03 and abs(torch.logit(base).std() - 1.2) < 0.03
    shifted = draw("shift", scale=1.2, shift=3.0).double()
    assert torch.allclose(shifted, 3 * base / (1 + 2 * base), atol=1e-6)
    flux = draw("flux-shift", scale=1.2).double()
    assert torch.allclose(flux, math.exp(0.8) / (math.exp(0.8) + 1 / base - 1), atol=1e-6)


def test_flux_shift_uses_the_pipelines_mu():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schedule = family("flux").flow_schedule(load_scheduler_config(), None)
    assert schedule.sampling.kind == "flux-shift"
    for tokens in (256, 1024, 4096):  # 256, 512 and 1024 px
        assert schedule.mu(tokens) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15))


def load_scheduler_config() -> dict:
    import json

    return json.loads((family("flux").config_dir() / "scheduler" / "scheduler_config.json").read_text())


def test_packing_round_trips_and_image_ids_are_the_grid():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 8)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 6, 8)
    assert packed.shape == (2, 12, 16)
    # token 1 holds rows 0-1, columns 2-3 of every channel, channel-major: feature 4c + 2·dy + dx
    assert torch.equal(packed[0, 1, :4], latents[0, 0, 0:2, 2:4].reshape(4))
    assert torch.equal(packed[0, 1, 0::4], latents[0, :, 0, 2])
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6, 8, 1), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert ids[5].tolist() == [0.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ training


def test_training_adapts_the_preset_and_the_blocks_asked_for(adapters):
    style, subject = read_file_deltas(adapters["style"]), read_file_deltas(adapters["subject"])
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    double = {f"transformer.transformer_blocks.0.attn.{name}" for name in attention}
    single = {f"transformer.single_transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v")}
    assert set(style) == double | single
    assert set(subject) == single | {"transformer.single_transformer_blocks.0.proj_mlp"}
    assert all(float(delta.abs().max()) > 0 for delta in [*style.values(), *subject.values()])
    plan = (adapters["subject"].parent / "subject.run" / "plan.txt").read_text()
    assert "transformer 4 modules (attention-mlp: to_q" in plan and "blocks double=1-18 single=0" in plan
    assert "flow_matching" in plan and "trainable" in plan  # the parameter count table
    # dev's default σ sampling is named; the ε/v-only settings (min-SNR, noise offset) are not listed
    assert "flow matching, timesteps flux-shift" in plan and "min-SNR" not in plan


@pytest.mark.slow  # two `python -m difflora` processes end to end (~30 s)
def test_the_cli_trains_and_generates_with_two_composed_adapters(flux_dir, data, adapters, tmp_path):
    common = [
        "--model",
        str(flux_dir),
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "1",
        "--batch-size",
        "1",
    ]
    common += [
        "--resolution",
        "32",
        "--sample-every",
        "0",
        "--num-threads",
        "2",
        "--timestep-sampling",
        "uniform",
    ]
    trained = run_cli(["train", str(data / "style"), *common, "--name", "cli"])
    assert trained.returncode == 0, trained.stderr
    assert set(read_file_deltas(tmp_path / "cli.safetensors")) == set(read_file_deltas(adapters["style"]))
    out = tmp_path / "images"
    generated = run_cli(
        [
            "generate",
            "a red stripe",
            "--model",
            str(flux_dir),
            "--adapters",
            "style:0.7,subject:0.3",
            "--adapter-dir",
            str(adapters["style"].parent),
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert generated.returncode == 0, generated.stderr
    assert len(list(out.glob("*.png"))) == 1


def test_composition_is_w0_plus_the_weighted_updates_and_returns_to_base_bit_for_bit(flux_dir, adapters):
    files = adapters
    pipe = load_pipeline(flux_dir)
    transformer = pipe.transformer
    base = {name: m.weight.detach().clone() for name, m in adaptable_modules(transformer).items()}
    image = np.asarray(render(pipe, ["a red stripe"], seeds=[1], steps=2, width=32, height=32)[0])
    composer = Composer(pipe, "fused", adapter_dirs=[files["style"].parent])
    composer.set(parse_adapter_weights("style:0.7,subject:0.3"))
    expected = {}
    for name, weight in (("style", 0.7), ("subject", 0.3)):
        for key, delta in read_file_deltas(files[name]).items():
            live = key.removeprefix("transformer.")
            expected[live] = expected.get(live, base[live].double()) + weight * delta
    assert len(expected) == 8 + 3 + 1  # double block attention, single block q/k/v, subject's proj_mlp
    for name, module in adaptable_modules(transformer).items():
        got = module.weight.double()
        if name in expected:
            assert torch.allclose(got, expected[name], rtol=1e-6, atol=1e-7), name
            assert not torch.equal(module.weight, base[name]), name
        else:
            assert torch.equal(module.weight, base[name]), name
    composer.set(parse_adapter_weights(""))
    for name, module in adaptable_modules(transformer).items():
        assert torch.equal(module.weight, base[name]), name
    assert np.array_equal(
        np.asarray(render(pipe, ["a red stripe"], seeds=[1], steps=2, width=32, height=32)[0]), image
    )


def test_merge_writes_the_weighted_sum_of_the_updates(adapters, tmp_path):
    from difflora.composition.merge import merge

    merged = merge(
        parse_adapter_weights("style:0.7,subject:0.3"),
        tmp_path / "m.safetensors",
        adapter_dirs=[adapters["style"].parent],
    )
    got = read_file_deltas(merged.path)
    want: dict[str, torch.Tensor] = {}
    for name, weight in (("style", 0.7), ("subject", 0.3)):
        for key, delta in read_file_deltas(adapters[name]).items():
            want[key] = want.get(key, torch.zeros_like(delta)) + weight * delta
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.allclose(got[key], value, rtol=1e-5, atol=1e-7), key


def test_serve_renders_a_request_with_two_adapters_and_goes_back_to_base(flux_dir, adapters):
    from difflora.config.generate import GenerateConfig
    from difflora.serving.engine import Engine

    pipe = load_pipeline(flux_dir)
    engine = Engine(pipe, adapter_dir=[str(adapters["style"].parent)])
    base = {name: m.weight.detach().clone() for name, m in adaptable_modules(pipe.transformer).items()}
    request = GenerateConfig(
        prompt="a red stripe", adapters=("style:0.7,subject:0.3",), steps=2, width=32, height=32
    )
    result = engine.generate(request)
    assert len(result.images) == 1
    engine.generate(GenerateConfig(prompt="a red stripe", steps=2, width=32, height=32))
    for name, module in adaptable_modules(pipe.transformer).items():
        assert torch.equal(module.weight, base[name]), name


def test_target_presets_are_declared_per_family_sd_included():
    from difflora.adapter.inject import resolve_targets
    from difflora.models.families.base import UNET_ATTENTION
    from tests.support.models import tiny_unet

    for name in ("sd1", "sd2", "sdxl"):
        assert family(name).target_preset("attention") == family(name).default_unet_targets == UNET_ATTENTION
    config = TrainConfig(data_dir="x", targets="attention-mlp")
    assert config.effective_unet_targets(family("sdxl")) == (*UNET_ATTENTION, "ff.net.0.proj", "ff.net.2")
    unet = tiny_unet()
    linear = [n for n, m in unet.named_modules() if type(m) is torch.nn.Linear]
    assert resolve_targets(unet, family("sd1").target_preset("all-linear"), component="unet") == linear
    with pytest.raises(ValueError, match="attention, attention-mlp, all-linear"):
        family("flux").target_preset("attn")


def test_the_text_encoder_option_trains_clip_l_and_leaves_t5_frozen(flux_dir, data, tmp_path):
    path = _train(flux_dir, tmp_path, data / "style", 5, train_text_encoder=True, blocks=("double=1-18",))
    components = {key.split(".")[0] for key in read_file_deltas(path)}
    assert components == {"transformer", "text_encoder"}


def test_an_all_in_one_checkpoint_loads_every_component_from_its_prefixes(tmp_path):
    from safetensors.torch import load_file

    pipe = tiny_flux_pipeline(seed=6)
    paths = write_flux_files(pipe, tmp_path / "parts", prefix=True, dtype=torch.float32)
    prefixes = {
        "model": "",
        "clip_l": "text_encoders.clip_l.transformer.",
        "t5": "text_encoders.t5xxl.transformer.",
    }
    prefixes["vae"] = "vae."
    combined = {
        prefixes[name] + key: value for name, path in paths.items() for key, value in load_file(path).items()
    }
    save_file(combined, str(tmp_path / "flux1-dev-all-in-one.safetensors"))
    loaded = load_pipeline(tmp_path / "flux1-dev-all-in-one.safetensors")
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert set(want) == set(got) and all(torch.equal(v, got[k]) for k, v in want.items()), component


def test_the_new_options_are_checked_with_the_flag_named():
    from difflora.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        TrainConfig(
            data_dir="x", timestep_sampling="cosmap", targets="attn", blocks=("double",), timestep_scale=0
        )
    for flag in ("--timestep-sampling", "--targets", "--blocks", "--timestep-scale"):
        assert flag in str(error.value)
    spec = TrainConfig(data_dir="x", blocks=("double=0-2,5", "single=7")).lora_spec(family("flux"))
    assert spec.blocks == (("transformer_blocks", (0, 1, 2, 5)), ("single_transformer_blocks", (7,)))
    assert spec.keeps("transformer", "transformer_blocks.5.attn.to_q")
    assert not spec.keeps("transformer", "transformer_blocks.3.attn.to_q")
    assert spec.keeps("text_encoder", "encoder.layers.3.self_attn.q_proj")
    with pytest.raises(ConfigError, match="block kinds are none"):
        TrainConfig(data_dir="x", blocks=("double=0",)).lora_spec(family("sd1"))
