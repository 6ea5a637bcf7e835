"""Load a single-file checkpoint (original ldm/sgm layout) of SD 1.x, SD 2.x or SDXL base with no network.

diffusers' `from_single_file` converts the weights; everything else it would fetch from the hub comes from the
package instead: the component configs from the shipped folder of the detected architecture
(`difflora/models/architectures/`), the tokenizers built from the embedded model's CLIP vocabulary with each
base's settings, and a scheduler predicting what the architecture predicts. `local_files_only=True` makes
any attempt to reach the hub an error rather than a silent download.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.errors import ModelError, first_n
from difflora.models.architecture import Architecture, detect_architecture
from difflora.models.dit_files import ComponentFiles, load_transformer_file

logger = logging.getLogger(__name__)

# The same 49,408-token CLIP BPE files serve every base; only the special tokens differ (see each base's
# tokenizer*/tokenizer_config.json), so the vocabulary is shipped once.
VOCAB_DIR = EMBEDDED_MODEL_DIR / "tokenizer"
_TOKENIZER_SETTINGS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")


def base_tokenizers(architecture: Architecture) -> dict[str, Any]:
    """{"tokenizer": ..., "tokenizer_2": ...} (SDXL has two) with the base's published settings: CLIP-L pads
    with "<|endoftext|>", OpenCLIP (SD 2.x, SDXL's second) with "!"; both stop at 77 tokens."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        config_path = architecture.config_dir / name / "tokenizer_config.json"
        if not config_path.is_file():
            continue
        built = architecture.family.own_tokenizer(name)
        if built is not None:
            tokenizers[name] = built
            continue
        settings = json.loads(config_path.read_text())
        own = architecture.family.tokenizer_file(name)
        if own is not None:  # a SentencePiece tokenizer (T5) shipped as its tokenizer.json
            keys = ("eos_token", "pad_token", "unk_token", "extra_ids", "model_max_length")
            tokenizers[name] = T5TokenizerFast(tokenizer_file=str(own), **{k: settings[k] for k in keys})
            continue
        tokenizers[name] = CLIPTokenizer(
            str(VOCAB_DIR / "vocab.json"),
            str(VOCAB_DIR / "merges.txt"),
            **{key: settings[key] for key in _TOKENIZER_SETTINGS if key in settings},
        )
    return tokenizers


def base_scheduler(architecture: Architecture) -> Any:
    """The base's published scheduler, predicting what `architecture` predicts (an SD 2.x 512-px base is
    the SD 2.1 scheduler with epsilon)."""
    import diffusers

    config = json.loads((architecture.config_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, config["_class_name"])
    return scheduler_class.from_config(config, prediction_type=architecture.prediction_type)


def _refuse_component_files(files: ComponentFiles | None, architecture: Architecture, path: Path) -> None:
    given = files.given() if files is not None else {}
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ModelError(
            f"{flags}: {path} is an {architecture.label} checkpoint, which holds its own text encoders and VAE; "
            "component files go with a transformer-only file (Flux.1). Leave them out."
        )


def load_single_file(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    files: ComponentFiles | None = None,
) -> Any:
    """The pipeline of a single-file checkpoint, after its architecture was detected from its keys. A
    transformer file (Flux.1) takes its other components from itself or from `files`."""
    architecture = detect_architecture(path, prediction_type=prediction_type, allow_pickle=allow_pickle)
    if architecture.family.checkpoint_layout != "ldm":
        return load_transformer_file(
            path,
            architecture.family,
            files or ComponentFiles(),
            dtype=dtype,
            tokenizers=base_tokenizers(architecture),
        )
    _refuse_component_files(files, architecture, path)
    import diffusers

    pipeline_class = getattr(diffusers, architecture.pipeline_class_name)
    components: dict[str, Any] = {**base_tokenizers(architecture), "scheduler": base_scheduler(architecture)}
    if architecture.family.pipeline_has_safety_checker:
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        with _diffusers_quiet():
            pipe = pipeline_class.from_single_file(
                str(path),
                config=str(architecture.config_dir),
                local_files_only=True,
                torch_dtype=dtype,
                **components,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelError(
            f"Could not load {path} as {architecture.label} (what its keys say it is): {error}\nThe file may "
            "be damaged or a non-standard variant. Convert it to a diffusers folder where you can and pass "
            "that folder with --model."
        ) from None
    _refuse_missing_weights(pipe, path, architecture)
    _set_native_size(pipe, architecture)
    return pipe


@contextmanager
def _diffusers_quiet() -> Iterator[None]:
    """The single-file path makes diffusers log warnings a user cannot act on (a float32 note on every
    `.to(dtype)`); missing weights, the one that matters, are reported by `_refuse_missing_weights`. They are
    kept for --debug runs."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    if not logger.isEnabledFor(logging.DEBUG):
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def _refuse_missing_weights(pipe: Any, path: Path, architecture: Architecture) -> None:
    """diffusers leaves a parameter the file lacks on the meta device and says nothing; the first forward
    pass would then fail far from the cause. Name what is missing here."""
    missing = [
        f"{name}.{parameter}"
        for name in (*architecture.family.components, "vae")
        if getattr(pipe, name, None) is not None
        for parameter, tensor in getattr(pipe, name).named_parameters()
        if tensor.is_meta
    ]
    if missing:
        raise ModelError(
            f"{path} lacks {len(missing)} weights of the {architecture.label} architecture "
            f"({first_n(missing, 3)}): it is not a complete {architecture.label} checkpoint (pruned, distilled "
            "or missing a component?). Use the full checkpoint, or a diffusers folder."
        )


def _set_native_size(pipe: Any, architecture: Architecture) -> None:
    """The pipeline's default image size is the UNet's sample size × the VAE factor: make it the detected
    native resolution (an SD 2.x 512-px base shares SD 2.1's 768-px configs otherwise)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if pipe.unet.config.sample_size * factor != architecture.resolution:
        pipe.unet.register_to_config(sample_size=architecture.resolution // factor)
