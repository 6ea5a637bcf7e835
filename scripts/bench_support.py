"""What several benchmark scripts share: the mean signature of an adapter's images, and full-size bases with
random weights (no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEEDS = (0, 1, 2, 3)
BASES = {
    "sd15": "sd1",
    "sdxl": "sdxl",
    "flux": "flux",
    "chroma": "chroma",
    "qwen-image": "qwen-image",
    "sd35-large": "sd3",
    "sd35-medium": "sd35-medium",
}  # name -> shipped configs
_WEIGHTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def adapter_signature(pipe, adapter: str | Path | None, prompt: str, measure: str) -> float:
    """`measure` (a function of difflora.embedded.signatures, e.g. "cross_score") averaged over the images of
    `prompt` at SEEDS, 20 steps, with `adapter` composed at weight 1 on `pipe` (None: the base alone)."""
    import numpy as np

    from difflora.composition.composer import compose
    from difflora.config.spec import parse_adapter_weights
    from difflora.embedded import signatures
    from difflora.generation.pipeline import render

    compose(pipe, parse_adapter_weights(f"{adapter}:1" if adapter else ""))
    images = render(pipe, [prompt] * len(SEEDS), seeds=list(SEEDS), steps=20, guidance=5.0)
    return float(np.mean([getattr(signatures, measure)(image) for image in images]))


def random_base(name: str, models_dir: Path, *, dtype: Any = None, device: str = "cpu") -> Path:
    """A diffusers folder of base `name` (a key of BASES) with random weights (PyTorch's default
    initialisation, seed 0), built from difflora's shipped configs and tokenizer files; written once, then
    reused. Benchmarks then run on the real model size without a download. `dtype` (default float32) is
    how the weights are stored; `device` where they are initialised (a GPU does SDXL's 3.5 B in seconds)."""
    import diffusers
    import torch

    from difflora.models.architecture import make_architecture
    from difflora.models.single_file import base_scheduler, base_tokenizers

    suffix = "" if dtype in (None, torch.float32) else f"-{str(dtype).removeprefix('torch.')}"
    folder = models_dir / f"{name}-random{suffix}"
    if (folder / "model_index.json").is_file():
        return folder
    architecture = make_architecture(BASES[name])  # type: ignore[arg-type]
    configs = architecture.config_dir
    index = json.loads((configs / "model_index.json").read_text())
    components: dict[str, Any] = {**base_tokenizers(architecture), "scheduler": base_scheduler(architecture)}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)  # built in the stored dtype: Flux's 12 B never in fp32
    try:
        with torch.device(device):
            for component in (c for c in _WEIGHTS if c in index):
                library, class_name = index[component]
                model = _random_model(library, class_name, configs / component)
                components[component] = model.to("cpu", dtype or torch.float32)
    finally:
        torch.set_default_dtype(default)
    if "safety_checker" in index:  # SD 1.x/2.x pipelines ask for one; difflora never loads it
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, index["_class_name"])(**components)
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial)
    partial.rename(folder)  # a folder with model_index.json is always a complete one
    return folder


def _random_model(library: str, class_name: str, config_dir: Path) -> Any:
    import diffusers
    import transformers

    if library == "diffusers":
        model_class = getattr(diffusers, class_name)
        return model_class.from_config(model_class.load_config(config_dir))
    model_class = getattr(transformers, class_name)
    return model_class(model_class.config_class.from_pretrained(config_dir))


def tiny_chroma(models_dir: Path) -> Path:
    """A tiny random Chroma folder for dry runs: the embedded tiny Flux's T5 (its tokenizer), autoencoder and
    widths (2 + 2 blocks of two 32-wide heads), with Chroma's transformer (the approximator at a 32 width,
    its real 64 input channels and 5 layers) and Chroma's shipped scheduler; written once, then reused."""
    import diffusers
    import torch
    import transformers

    from difflora.embedded import EMBEDDED_MODEL_DIR
    from difflora.models.architecture import make_architecture
    from difflora.models.single_file import base_scheduler

    folder = models_dir / "chroma-tiny"
    if (folder / "model_index.json").is_file():
        return folder
    flux = EMBEDDED_MODEL_DIR.parent / "flux"
    flux_transformer = json.loads((flux / "transformer" / "config.json").read_text())
    widths = ("attention_head_dim", "axes_dims_rope", "in_channels", "joint_attention_dim")
    config = {key: flux_transformer[key] for key in (*widths, "num_attention_heads", "num_layers")}
    config |= {"num_single_layers": flux_transformer["num_single_layers"], "approximator_hidden_dim": 32}
    torch.manual_seed(0)
    pipe = diffusers.ChromaPipeline(
        scheduler=base_scheduler(make_architecture("chroma")),
        vae=diffusers.AutoencoderKL.from_pretrained(flux / "vae"),
        text_encoder=transformers.T5EncoderModel.from_pretrained(flux / "text_encoder_2"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(flux / "tokenizer_2"),
        transformer=diffusers.ChromaTransformer2DModel(**config),
    )
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial)
    (partial / "difflora_defaults.json").write_text(json.dumps({"max_sequence_length": 32, "resolution": 64}))
    partial.rename(folder)
    return folder


# The reduced Qwen-Image of the GPU check's dry run: its shipped configurations at reduced width and depth
# (128-wide heads, the real vocabulary, rotary axes and autoencoder levels kept), as tests/support/qwen_image.py.
_TINY_QWEN = {
    "transformer": {"num_layers": 2, "num_attention_heads": 2, "joint_attention_dim": 256},
    "text_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2},
    "text_heads": {"num_attention_heads": 2, "num_key_value_heads": 1, "max_window_layers": 2},
    "vision_config": {"depth": 1, "hidden_size": 160, "num_heads": 2, "intermediate_size": 64},
    "vae": {"base_dim": 8},
}


def tiny_qwen_image(models_dir: Path) -> Path:
    """A reduced random Qwen-Image as a diffusers folder (built once, then reused): what the GPU check's dry
    run trains on the CPU in seconds."""
    import diffusers
    import torch
    import transformers

    from difflora.models.architecture import make_architecture
    from difflora.models.single_file import base_scheduler, base_tokenizers

    folder = models_dir / "qwen-image-tiny"
    if (folder / "model_index.json").is_file():
        return folder
    architecture = make_architecture("qwen-image")
    configs = architecture.config_dir
    torch.manual_seed(0)
    shipped = {
        c: json.loads((configs / c / "config.json").read_text())
        for c in ("transformer", "vae", "text_encoder")
    }
    transformer = diffusers.QwenImageTransformer2DModel.from_config(
        shipped["transformer"] | _TINY_QWEN["transformer"]
    )
    vae = diffusers.AutoencoderKLQwenImage.from_config(shipped["vae"] | _TINY_QWEN["vae"])
    encoder = shipped["text_encoder"]
    text = encoder["text_config"] | _TINY_QWEN["text_config"] | _TINY_QWEN["text_heads"]
    vision = (
        encoder["vision_config"]
        | _TINY_QWEN["vision_config"]
        | {"out_hidden_size": 256, "fullatt_block_indexes": []}
    )
    settings = {k: v for k, v in encoder.items() if k not in ("architectures", "model_type")}
    config = transformers.Qwen2_5_VLConfig(**settings | {"text_config": text, "vision_config": vision})
    pipe = diffusers.QwenImagePipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=transformers.Qwen2_5_VLForConditionalGeneration(config),
        scheduler=base_scheduler(architecture),
        **base_tokenizers(architecture),
    )
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial)
    partial.rename(folder)
    return folder


# The reduced SD3.5 of the GPU check's dry run: its shipped configurations at reduced width and depth (4 joint
# blocks of two 64-wide heads, the real head width; 1-layer CLIPs and T5 with the real vocabularies; the
# autoencoder's 4 levels at 32 channels, so still 8 px per latent), the sizes tests/support/sd3.py works with.
_TINY_SD3 = {
    "transformer": {"num_layers": 4, "num_attention_heads": 2, "joint_attention_dim": 64,
                    "caption_projection_dim": 128, "pooled_projection_dim": 64, "pos_embed_max_size": 16},
    "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
             "projection_dim": 32},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32},
}  # fmt: skip
_TINY_T5_TOKENS = 32  # the tokenizer's length, which the family reads T5 at: the CPU step stays short


def tiny_sd35(models_dir: Path, name: str = "sd35-medium") -> Path:
    """A reduced random SD3.5 (`name` a key of BASES: medium keeps MMDiT-X's second attention in its first
    block) as a diffusers folder, built once, then reused: what the GPU check's dry run trains on the CPU."""
    import diffusers
    import torch
    import transformers

    from difflora.models.architecture import make_architecture
    from difflora.models.single_file import base_scheduler, base_tokenizers

    folder = models_dir / f"{name}-tiny"
    if (folder / "model_index.json").is_file():
        return folder
    architecture = make_architecture(BASES[name])  # type: ignore[arg-type]
    configs = architecture.config_dir
    shipped = {c: json.loads((configs / c / "config.json").read_text()) for c in _WEIGHTS if c != "unet"}
    transformer = shipped["transformer"] | _TINY_SD3["transformer"]
    transformer["dual_attention_layers"] = [0] if transformer["dual_attention_layers"] else []
    tokenizers = base_tokenizers(architecture)
    tokenizers["tokenizer_3"].model_max_length = _TINY_T5_TOKENS
    torch.manual_seed(0)
    components = {
        "transformer": diffusers.SD3Transformer2DModel.from_config(transformer),
        "vae": diffusers.AutoencoderKL.from_config(shipped["vae"] | _TINY_SD3["vae"]),
        "text_encoder_3": transformers.T5EncoderModel(_config(shipped["text_encoder_3"], _TINY_SD3["t5"])),
    }
    for encoder in ("text_encoder", "text_encoder_2"):
        config = _config(shipped[encoder], _TINY_SD3["clip"])
        components[encoder] = transformers.CLIPTextModelWithProjection(config)
    pipe = diffusers.StableDiffusion3Pipeline(
        **components, **tokenizers, scheduler=base_scheduler(architecture)
    )
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial)
    partial.rename(folder)
    return folder


def _config(shipped: dict, reduced: dict) -> Any:
    """A transformers configuration: the shipped one with `reduced` sizes."""
    import transformers

    settings = {k: v for k, v in shipped.items() if k not in ("architectures", "model_type")}
    return transformers.AutoConfig.for_model(shipped["model_type"], **settings | reduced)
