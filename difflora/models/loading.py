"""Resolve `--model` and load a Stable Diffusion model, offline first.

`--model` may be omitted (the embedded tiny model shipped inside the package), a local diffusers folder,
a single-file `.safetensors` checkpoint of SD 1.x, SD 2.x or SDXL base (loaded with no network: see
`difflora.models.single_file`), or a hub id (only where there is a network). Whatever was given,
callers get a diffusers pipeline and a `ModelIdentity`: the architecture family and a hash that tells two
bases apart, which adapters record so that applying one to another base is caught with a clear message.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.errors import ModelError
from difflora.models.architecture import check_prediction_type, folder_architecture
from difflora.models.dit_files import ComponentFiles
from difflora.models.single_file import load_single_file

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"

SourceKind = Literal["embedded", "folder", "single_file", "hub"]


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str

    @property
    def display(self) -> str:
        return "embedded tiny model" if self.kind == "embedded" else self.location


def resolve_model(ref: str | os.PathLike | None) -> ModelSource:
    """Decide what kind of model reference `ref` is, without loading it."""
    if ref is None or str(ref) in ("", EMBEDDED_NAME):
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise ModelError(
                f"The embedded model is missing from {EMBEDDED_MODEL_DIR}: the installation is incomplete. "
                "Reinstall difflora, or pass --model with a diffusers folder."
            )
        return ModelSource("embedded", str(EMBEDDED_MODEL_DIR))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is a folder but not a diffusers model (no model_index.json). Pass the folder that "
                "contains model_index.json, a single-file .safetensors checkpoint, or omit --model."
            )
        return ModelSource("folder", str(path))
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise ModelError(f"Model file not found: {path}")
        return ModelSource("single_file", str(path))
    text = str(ref)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        return ModelSource("hub", text)
    raise ModelError(
        f"--model {text!r} is neither a diffusers folder, a .safetensors checkpoint, nor a hub id "
        "(owner/name). Omit --model to use the embedded tiny model."
    )


def load_pipeline(
    ref: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    files: ComponentFiles | None = None,
) -> Any:
    """Load a text-to-image pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline).
    `files`: the text encoders and VAE of a transformer-only single file (Flux.1), as files of their own.

    `prediction_type` ("epsilon" or "v_prediction") overrides what the model's scheduler config says, or,
    for a single file, what its architecture implies (SD 2.x defaults to SD 2.1's v-prediction at 768 px;
    pass "epsilon" for a 512-px SD 2.x base)."""
    source = resolve_model(ref)
    pipe = _load(source, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type, files=files)
    pipe.set_progress_bar_config(disable=True)
    pipe._difflora_source = source  # read by model_identity(); diffusers pipelines accept attributes
    return pipe.to(device)


def _load(
    source: ModelSource,
    *,
    dtype: torch.dtype,
    allow_pickle: bool,
    prediction_type: str | None,
    files: ComponentFiles | None = None,
) -> Any:
    check_prediction_type(prediction_type)
    if files is not None and files.given() and source.kind != "single_file":
        flags = ", ".join("--" + name.replace("_", "-") for name in files.given())
        raise ModelError(
            f"{flags}: component files go with a single-file transformer --model; leave them out."
        )
    _quiet_loading()
    with warnings.catch_warnings():
        # diffusers >= 0.36 renamed torch_dtype to dtype and warns on the old name; older releases, which
        # pyproject still allows, know only torch_dtype. The warning says nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if source.kind == "single_file":
            return load_single_file(
                Path(source.location),
                dtype=dtype,
                allow_pickle=allow_pickle,
                prediction_type=prediction_type,
                files=files,
            )
        if source.kind == "folder":
            folder_architecture(Path(source.location), prediction_type=prediction_type)  # refuses SD3, ...
        pipe = _load_pipeline(source, dtype=dtype)
    if prediction_type is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    return pipe


def _quiet_loading() -> None:
    """diffusers and transformers draw a progress bar per component even for a local 30 MB folder; the
    CLI has its own progress display, so keep theirs for --debug runs only."""
    if logger.isEnabledFor(logging.DEBUG):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _takes_safety_checker(folder: Path) -> bool:
    """Whether the folder's pipeline class has a safety checker (which difflora always leaves out)."""
    import inspect
    import json

    import diffusers

    name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    pipeline_class = getattr(diffusers, str(name), None)
    return pipeline_class is None or "safety_checker" in inspect.signature(pipeline_class.__init__).parameters


def _load_pipeline(source: ModelSource, *, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    common: dict[str, Any] = {"torch_dtype": dtype}
    if source.kind in ("embedded", "folder"):
        if _takes_safety_checker(Path(source.location)):  # FluxPipeline warns about an argument it lacks
            common["safety_checker"] = None
        try:
            return DiffusionPipeline.from_pretrained(source.location, local_files_only=True, **common)
        except (OSError, ValueError) as error:
            raise ModelError(f"Could not load the diffusers model in {source.location}: {error}") from None
    try:
        return DiffusionPipeline.from_pretrained(source.location, **common)
    except OSError as error:
        raise ModelError(
            f"Could not load {source.location!r} from the model hub: {error}\nThere may be no network here. "
            "Download the model elsewhere and pass its local diffusers folder or .safetensors file with "
            "--model, or omit --model to use the embedded tiny model."
        ) from None
