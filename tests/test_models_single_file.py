"""Single-file checkpoints of the real bases: architecture detection, refusals, offline loading.

The oracle is diffusers' own single-file converter: `tests/support/checkpoints.py` writes a checkpoint in the
original ldm/sgm layout from its own name mapping, diffusers loads it, and every parameter of the loaded
pipeline must equal the tensor written under the original name the mapping gives it. A wrong name would
leave a parameter on the meta device or put another tensor in its place. The full-size runs are slow (the
SDXL file is 6.9 GB); detection and refusals are fast, on header-only (sparse) files and tiny fakes.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflora.errors import ModelError
from difflora.formats.reference import reference_model
from difflora.models.architecture import (
    config_folder,
    detect_architecture,
    folder_architecture,
    pipeline_architecture,
)
from difflora.models.geometry import model_geometry
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from difflora.models.single_file import base_scheduler, base_tokenizers
from tests.support.checkpoints import (
    checkpoint_entries,
    original_tensor,
    write_header_only,
)
from tests.support.models import tiny_pipeline

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
VAE = "first_stage_model.encoder.conv_in.weight"


def fake_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A small safetensors file holding only the keys that decide (zeros of the given shapes)."""
    save_file({key: torch.zeros(shape, dtype=torch.float16) for key, shape in shapes.items()}, str(path))
    return path


def sd1_keys(**changes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    keys = {
        CONV_IN: (320, 4, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
        VAE: (128, 3, 3, 3),
    }
    return keys | changes


# ------------------------------------------------------------------------------------------ fast: detection


@pytest.mark.parametrize(
    ("family", "label", "prediction", "resolution"),
    [
        ("sd1", "SD 1.x", "epsilon", 512),
        ("sd2", "SD 2.x (v-prediction, 768 px)", "v_prediction", 768),
        ("sdxl", "SDXL base", "epsilon", 1024),
    ],
)
def test_the_full_original_key_list_of_each_base_is_recognised(
    tmp_path, family, label, prediction, resolution
):
    path = tmp_path / f"{family}.safetensors"
    write_header_only(path, family)
    found = detect_architecture(path)
    assert (found.name, found.label, found.prediction_type, found.resolution) == (
        family,
        label,
        prediction,
        resolution,
    )
    assert (found.config_dir / "model_index.json").is_file()


def test_an_sd2_file_can_be_declared_a_512px_epsilon_base(tmp_path):
    path = tmp_path / "sd2.safetensors"
    write_header_only(path, "sd2")
    found = detect_architecture(path, prediction_type="epsilon")
    assert (found.prediction_type, found.resolution, found.label) == (
        "epsilon",
        512,
        "SD 2.x (epsilon, 512 px)",
    )
    with pytest.raises(ModelError, match="epsilon, v_prediction"):
        detect_architecture(path, prediction_type="v")


def test_a_file_that_marks_v_prediction_is_believed(tmp_path):
    path = fake_checkpoint(tmp_path / "vpred.safetensors", sd1_keys(v_pred=()))
    assert detect_architecture(path).label == "SD 1.x (v-prediction)"


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (
            {UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,)},
            "Stable Diffusion 3.*joint_blocks",
        ),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "Flux.*double_blocks"),
        (
            {
                CONV_IN: (384, 4, 3, 3),
                "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
            },
            "SDXL refiner.*conditioner.embedders.0.model",
        ),
        (sd1_keys(**{CONV_IN: (320, 9, 3, 3)}), "inpainting UNet.*9 channels"),
        (sd1_keys(**{CONV_IN: (320, 8, 3, 3)}), "8 input channels"),
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
            "LoRA adapter.*--adapters",
        ),
        (
            {"encoder.layers.0.weight": (4, 4), "decoder.weight": (4,)},
            "no model.diffusion_model.*decoder., encoder.",
        ),
    ],
    ids=["sd3", "flux", "sdxl-refiner", "inpainting", "pix2pix", "lora", "unknown"],
)
def test_unsupported_files_are_refused_naming_what_decided(tmp_path, shapes, message):
    path = fake_checkpoint(tmp_path / "model.safetensors", shapes)
    with pytest.raises(ModelError, match=message) as caught:
        detect_architecture(path)
    if "LoRA" not in message:
        assert "SD 1.x, SD 2.x" in str(caught.value) and "SDXL base" in str(caught.value)


def test_a_mismatched_file_names_the_facts_that_decided(tmp_path):
    """A 768-context UNet with an OpenCLIP encoder is none of the bases; so is a UNet-only file."""
    mixed = sd1_keys(**{"cond_stage_model.model.token_embedding.weight": (8, 1024)})
    del mixed["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(
        ModelError, match=r"context 768 \(model.diffusion_model.*attn2.to_k.weight\).*OpenCLIP ViT-H"
    ):
        detect_architecture(fake_checkpoint(tmp_path / "mixed.safetensors", mixed))
    unet_only = {k: v for k, v in sd1_keys().items() if k.startswith(UNET)}
    with pytest.raises(ModelError, match="text encoders: none.*UNet-only"):
        detect_architecture(fake_checkpoint(tmp_path / "unet.safetensors", unet_only))
    no_vae = {k: v for k, v in sd1_keys().items() if k != VAE}
    with pytest.raises(ModelError, match="no VAE"):
        detect_architecture(fake_checkpoint(tmp_path / "novae.safetensors", no_vae))


def test_damaged_and_pickled_files_are_explained(tmp_path):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="not a safetensors file"):
        detect_architecture(garbage)
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(fake_checkpoint(tmp_path / "whole.safetensors", sd1_keys()).read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated"):
        detect_architecture(truncated)
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {key: torch.zeros(shape) for key, shape in sd1_keys().items()}}, pickled)
    with pytest.raises(ModelError, match="allow-pickle"):
        detect_architecture(pickled)
    assert detect_architecture(pickled, allow_pickle=True).name == "sd1"


def test_loading_refuses_an_unsupported_file_before_reading_weights(tmp_path):
    path = fake_checkpoint(tmp_path / "sd3.safetensors", {"joint_blocks.0.x_block.mlp.fc1.weight": (4, 4)})
    with pytest.raises(ModelError, match="Stable Diffusion 3"):
        load_pipeline(path)


def test_check_reads_a_single_files_geometry_through_its_architecture(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    write_header_only(path, "sdxl")
    geometry = model_geometry(str(path))
    assert (geometry.resolution, geometry.max_tokens, geometry.note) == (1024, 75, None)
    sd2 = tmp_path / "sd2.safetensors"
    write_header_only(sd2, "sd2")
    assert model_geometry(str(sd2), prediction_type="epsilon").resolution == 512


# ------------------------------------------------------------------------------------------ fast: folders


def _config_copy(tmp_path: Path, family: str) -> Path:
    folder = tmp_path / family
    shutil.copytree(config_folder(family), folder)
    return folder


def test_folder_configs_give_the_same_facts(tmp_path):
    assert detect_architecture(_config_copy(tmp_path, "sdxl")).label == "SDXL base"
    sd2 = _config_copy(tmp_path, "sd2")
    assert detect_architecture(sd2).label == "SD 2.x (v-prediction, 768 px)"
    # an SD 2.x base folder says epsilon in its scheduler and 64 latents (512 px) in its UNet config
    for part, key, value in [
        ("scheduler/scheduler_config.json", "prediction_type", "epsilon"),
        ("unet/config.json", "sample_size", 64),
    ]:
        config = json.loads((sd2 / part).read_text())
        (sd2 / part).write_text(json.dumps(config | {key: value}))
    assert detect_architecture(sd2).label == "SD 2.x (epsilon, 512 px)"


def test_custom_folders_pass_and_unsupported_folders_are_refused(tmp_path):
    tiny = tmp_path / "tiny"
    tiny_pipeline(tmp_path).save_pretrained(tiny)
    assert folder_architecture(tiny) is None  # custom architectures still train
    assert pipeline_architecture(load_pipeline(tiny)) is None
    with pytest.raises(ModelError, match="custom architecture"):
        detect_architecture(tiny)
    inpaint = _config_copy(tmp_path, "sd1")
    unet = json.loads((inpaint / "unet/config.json").read_text())
    (inpaint / "unet/config.json").write_text(json.dumps(unet | {"in_channels": 9}))
    with pytest.raises(ModelError, match="9 input channels"):
        load_pipeline(inpaint)
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="FluxPipeline, which has no UNet"):
        load_pipeline(flux)


def test_a_prediction_type_given_for_a_folder_replaces_the_schedulers(tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline(tmp_path).save_pretrained(folder)
    pipe = load_pipeline(folder, prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert model_identity(pipe).prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ fast: configs


# The published parameter counts of the original models (SD 1.5 UNet 859.52 M, SD 2.x UNet 865.91 M, SDXL UNet
# 2.567 B, CLIP ViT-L text 123.06 M, OpenCLIP ViT-H text without its last block 340.39 M, OpenCLIP ViT-bigG text
# with projection 694.66 M, the KL-f8 VAE 83.65 M): a typo in a shipped config that changes a shape shows here.
PUBLISHED_COUNTS = {
    ("sd1", "unet"): 859_520_964,
    ("sd1", "text_encoder"): 123_060_480,
    ("sd2", "unet"): 865_910_724,
    ("sd2", "text_encoder"): 340_387_840,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


@pytest.mark.parametrize(("family", "component"), list(PUBLISHED_COUNTS))
def test_shipped_configs_build_the_published_models(family, component):
    count = sum(parameter.numel() for parameter in reference_model(family, component).parameters())
    assert count == PUBLISHED_COUNTS[family, component]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_vae_is_the_published_kl_f8_and_only_sdxl_rescales(family):
    entries = [e for e in checkpoint_entries(family) if e.component == "vae"]
    assert sum(math.prod(e.shape) for e in entries) == 83_653_863
    vae = json.loads((config_folder(family) / "vae" / "config.json").read_text())
    assert (vae.get("scaling_factor", 0.18215), vae.get("force_upcast", False)) == (
        (0.13025, True) if family == "sdxl" else (0.18215, False)
    )


def test_tokenizers_are_built_from_the_one_vocabulary_with_each_bases_settings(tmp_path):
    arch = {family: detect_architecture(_config_copy(tmp_path, family)) for family in ("sd1", "sd2", "sdxl")}
    pads = {f: [t.pad_token for t in base_tokenizers(a).values()] for f, a in arch.items()}
    assert pads == {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}
    tokenizer = base_tokenizers(arch["sd2"])["tokenizer"]
    assert (tokenizer.model_max_length, len(tokenizer)) == (77, 49408)
    # CLIP's ids for these words, as every SD tokenizer gives them (<|startoftext|> ... <|endoftext|>)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a cat", padding="max_length").input_ids[3:6] == [49407, 0, 0]  # "!" is id 0
    assert base_scheduler(arch["sd2"]).config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ slow: the oracle


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must need nothing but the file and the package."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_loaded_exactly(pipe, path: Path, entries) -> None:
    """Every parameter of every component equals the tensor written under its original name: the layout is
    exactly the original one and no parameter was left at an initial value."""
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {entry.key for entry in entries}
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, component, None)
            if model is None:
                continue
            params = dict(model.named_parameters())
            assert not [name for name, p in params.items() if p.is_meta], f"{component} has unloaded weights"
            covered: set[str] = set()
            for entry in (e for e in entries if e.component == component):
                expected = handle.get_tensor(entry.key)
                got = original_tensor(entry, params)
                assert torch.equal(got, expected.to(got.dtype)), (
                    f"{entry.key} does not land in {entry.params}"
                )
                covered.update(entry.params)
            assert covered == set(params), (
                f"{component} parameters not from the file: {set(params) - covered}"
            )


def unet_output_is_finite(pipe, context: int) -> bool:
    dtype = pipe.unet.dtype
    latents = torch.randn(1, 4, 8, 8, dtype=dtype)
    text = torch.randn(1, 77, context, dtype=dtype)
    extra = {}
    if context == 2048:
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, 1280, dtype=dtype),
                "time_ids": torch.zeros(1, 6, dtype=dtype),
            }
        }
    with torch.no_grad():
        out = pipe.unet(latents, 500, encoder_hidden_states=text, **extra).sample
    return bool(torch.isfinite(out).all())


@pytest.mark.slow
@pytest.mark.parametrize("real_checkpoint", ["sd1"], indirect=True)
def test_an_sd15_checkpoint_loads_offline_exactly(real_checkpoint, no_network):
    big_file, entries = real_checkpoint, checkpoint_entries("sd1")
    assert detect_architecture(big_file).label == "SD 1.x"
    pipe = load_pipeline(big_file)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert_loaded_exactly(pipe, big_file, entries)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.unet.config.sample_size == 64
    assert model_identity(pipe).family == "sd1"
    assert pipeline_architecture(pipe) == detect_architecture(big_file)
    assert unet_output_is_finite(pipe, 768)


@pytest.mark.slow
@pytest.mark.parametrize("real_checkpoint", ["sd2"], indirect=True)
def test_an_sd21_checkpoint_loads_offline_exactly(real_checkpoint, no_network):
    big_file, entries = real_checkpoint, checkpoint_entries("sd2")
    pipe = load_pipeline(big_file)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert_loaded_exactly(pipe, big_file, entries)
    assert (pipe.scheduler.config.prediction_type, pipe.unet.config.sample_size) == ("v_prediction", 96)
    assert pipe.tokenizer.pad_token == "!" and model_identity(pipe).family == "sd2"
    assert pipeline_architecture(pipe).label == "SD 2.x (v-prediction, 768 px)"
    assert unet_output_is_finite(pipe, 1024)
    del pipe
    base = load_pipeline(big_file, prediction_type="epsilon", dtype=torch.bfloat16)
    assert (base.scheduler.config.prediction_type, base.unet.config.sample_size) == ("epsilon", 64)
    assert pipeline_architecture(base).label == "SD 2.x (epsilon, 512 px)"


@pytest.mark.slow
@pytest.mark.parametrize("real_checkpoint", ["sdxl"], indirect=True)
def test_an_sdxl_checkpoint_loads_offline_exactly(real_checkpoint, no_network):
    big_file, entries = real_checkpoint, checkpoint_entries("sdxl")
    assert detect_architecture(big_file).label == "SDXL base"
    pipe = load_pipeline(big_file, dtype=torch.bfloat16)  # bfloat16 keeps the peak RAM down
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert_loaded_exactly(pipe, big_file, entries)
    assert [pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token] == ["<|endoftext|>", "!"]
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert model_identity(pipe).family == "sdxl" and pipeline_architecture(pipe).label == "SDXL base"
    assert unet_output_is_finite(pipe, 2048)
