"""Load a transformer model (Flux.1, SD3) from single files, as ComfyUI users have them, with no network: a BFL
transformer file (`difflora.models.bfl_file`) plus its text encoders and autoencoder, either inside the same
all-in-one file (under the prefixes its family declares in `single_file_parts`) or as files of their own
(`--clip-l`, `--clip-g`, `--t5`, `--vae`: Hugging Face layouts for the text encoders, the original autoencoder layout).
Component configurations come from the family's shipped folder, with the depth and channels each file has
read from its weights (a reduced text encoder or an autoencoder of other latent channels loads as it is).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflora.errors import ModelError
from difflora.models.families import ModelFamily

CLIP_HEAD_WIDTH = 64


@dataclass(frozen=True)
class ComponentFiles:
    """Component files given beside `--model` (by option name: clip_l, t5, vae, clip_g); None: not given."""

    clip_l: str | None = None
    t5: str | None = None
    vae: str | None = None
    clip_g: str | None = None
    text_encoder: str | None = None  # Qwen-Image's Qwen2.5-VL file (`--text-encoder`)

    def given(self) -> dict[str, str]:
        return {name: path for name, path in vars(self).items() if path}


def load_transformer_file(
    path: Path, family: ModelFamily, files: ComponentFiles, *, dtype: torch.dtype, tokenizers: dict[str, Any]
) -> Any:
    """The family's pipeline from a transformer file and its components (from the same file or `files`)."""
    import diffusers

    state = _read(path)
    parts = _parts(state, family, files, source=path)
    folder = family.config_dir()
    assert folder is not None
    shipped = json.loads((folder / family.denoiser / "config.json").read_text())
    encoders = {
        component: _encoder(kind, parts[component], folder, component, dtype)
        for component, kind in family.single_file_encoders.items()
    }
    components = {
        family.denoiser: family.build_transformer(state, shipped, dtype),
        **encoders,
        "vae": _vae(parts["vae"], folder, dtype, family.single_file_vae),
        "scheduler": _scheduler(folder),
        **tokenizers,
    }
    return getattr(diffusers, family.pipeline_class_name)(**components)


def _encoder(
    kind: str, state: dict[str, torch.Tensor], folder: Path, component: str, dtype: torch.dtype
) -> Any:
    """Text encoder `component` of kind `clip`, `clip-projection`, `t5` or `qwen2.5-vl` (`single_file_encoders`)."""
    if kind == "qwen2.5-vl":
        from difflora.models.qwen_files import text_encoder

        return text_encoder(state, _config(folder, component), dtype)
    if kind == "t5":
        return _t5(state, folder, component, dtype)
    return _clip(state, folder, component, dtype, projection=kind == "clip-projection")


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path} is not a .safetensors file: transformer models load from safetensors only.")
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"Could not read {path}: {error}") from None


def _parts(
    state: dict[str, torch.Tensor], family: ModelFamily, files: ComponentFiles, *, source: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors (prefix removed): from its own file when given, else from the main file."""
    given = files.given()
    unused = [option for option in given if option not in family.part_options.values()]
    if unused:
        raise ModelError(
            f"--{unused[0].replace('_', '-')}: {family.label} models have no such component; leave it out."
        )
    found = {}
    for component, prefixes in family.single_file_parts.items():
        option = family.part_options[component]
        if option in given:
            found[component] = _strip(_read(Path(given[option])), prefixes)
            continue
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            flag = "--" + option.replace("_", "-")
            raise ModelError(
                f"{source} holds no {component} ({' or '.join(prefixes)}*): pass it with {flag} FILE "
                f"(ComfyUI's {option}.safetensors), or use an all-in-one checkpoint or a diffusers folder."
            )
        found[component] = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return found


def _strip(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A separate file's tensors, without an all-in-one prefix if it has one."""
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _config(folder: Path, component: str) -> dict[str, Any]:
    return json.loads((folder / component / "config.json").read_text())


def _layers(state: Mapping[str, Any], marker: str) -> int:
    """How many numbered layers follow `marker` in the tensor names (read, never assumed)."""
    indices = {int(k[k.index(marker) + len(marker) :].split(".")[0]) for k in state if marker in k}
    return max(indices) + 1 if indices else 0


def _clip(
    state: dict[str, torch.Tensor], folder: Path, component: str, dtype: torch.dtype, *, projection: bool
) -> Any:
    """CLIPTextModel, or CLIPTextModelWithProjection holding the file's `text_projection` (SD3's pooled input)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kept = "text_projection.weight" if projection else None
    state = {
        k if k.startswith("text_model.") or k == kept else "text_model." + k: v for k, v in state.items()
    }
    settings = _config(folder, component)
    settings["num_hidden_layers"] = _layers(state, "encoder.layers.") or settings["num_hidden_layers"]
    settings["hidden_size"] = hidden = state["text_model.final_layer_norm.weight"].shape[0]
    settings["intermediate_size"] = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    # head count is in no tensor's shape: CLIP's heads are 64 wide (CLIP-L: 768 / 12)
    settings["num_attention_heads"] = max(1, hidden // CLIP_HEAD_WIDTH)
    if projection:
        settings["projection_dim"] = state["text_projection.weight"].shape[0]
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = _empty(lambda: model_class(CLIPTextConfig(**settings)))
    if not any(key.startswith("text_model.") for key in model.state_dict()):  # transformers 5 is flat
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    unused = {
        *(() if projection else ("text_projection.weight",)),
        "logit_scale",
        "text_model.embeddings.position_ids",
        "embeddings.position_ids",
    }
    return _load(model, {k: v for k, v in state.items() if k not in unused}, f"CLIP ({component})", dtype)


def _t5(state: dict[str, torch.Tensor], folder: Path, component: str, dtype: torch.dtype) -> Any:
    from transformers import T5Config, T5EncoderModel

    settings = _config(folder, component)
    settings["num_layers"] = _layers(state, "encoder.block.") or settings["num_layers"]
    settings["d_model"] = state["shared.weight"].shape[1]
    attention = "encoder.block.0.layer.0.SelfAttention."
    settings["num_heads"] = heads = state[attention + "relative_attention_bias.weight"].shape[1]
    settings["d_kv"] = state[attention + "q.weight"].shape[0] // heads
    settings["d_ff"] = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    model = _empty(lambda: T5EncoderModel(T5Config(**settings)))
    state = dict(state)
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])  # tied; often left out
    return _load(model, state, "T5-XXL", dtype)


def _vae(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype, layout: str = "ldm") -> Any:
    if layout == "wan":
        from difflora.models.qwen_files import vae

        return vae(state, _config(folder, "vae"), dtype)
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    settings = _config(folder, "vae")
    settings["latent_channels"] = state["encoder.conv_out.weight"].shape[0] // 2
    levels = _layers(state, "encoder.down.")
    settings["block_out_channels"] = [
        state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)
    ]
    settings["layers_per_block"] = _layers(state, "encoder.down.0.block.")
    for kind in ("down_block_types", "up_block_types"):
        settings[kind] = settings[kind][:1] * levels
    model = _empty(lambda: AutoencoderKL.from_config({k: v for k, v in settings.items() if k[0] != "_"}))
    return _load(model, convert_ldm_vae_checkpoint(state, settings), "autoencoder", dtype)


def _empty(build: Any) -> Any:
    """A model built without allocating its weights (a full-size T5-XXL would take minutes to initialise
    only to be overwritten); `_load` assigns the file's tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, dtype: torch.dtype) -> Any:
    """Every parameter from the file (a missing or unplaced one is an error), in `dtype`."""
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing += [k for k, v in model.named_parameters() if v.is_meta and k not in missing]
    if missing or result.unexpected_keys:
        named = (missing or result.unexpected_keys)[:3]
        raise ModelError(
            f"The {what} weights do not fit its architecture ({'missing' if missing else 'unexpected'}: "
            f"{', '.join(named)}): pass the matching file."
        )
    return model.eval()  # every tensor came from the file, already in dtype


def _scheduler(folder: Path) -> Any:
    import diffusers

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)
