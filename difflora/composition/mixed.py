"""Different adapter sets in one batched forward: sample i of a batch gets its own weighted set of adapters.

For every module some adapter of the batch adapts (a Linear or Conv2d of the denoiser or a text encoder),
a forward hook adds to the base output W0·x the per-sample low-rank update

    Σⱼ wᵢⱼ · (αⱼ / rⱼ) · Bⱼ · (Aⱼ · x)

as one gathered matmul pair: the downs of all the batch's adapters that adapt the module are concatenated
(A_cat, R_total × in), x·A_catᵀ is multiplied by a per-sample scale matrix (batch × R_total: sample i's
wᵢⱼ·αⱼ/rⱼ over adapter j's rank slots, zeros where adapter j is not in sample i's set), then ·B_catᵀ.
wᵢⱼ is the weight the composer would use for that module (the text-encoder weight on text encoders, times
the block factor of `@out=1,in=0` specs), so sample i renders what request i renders alone with its set
fused — up to float rounding (the fused mode rounds W0 + Σ wΔW to the weights' type once; here the update is
added to the output).

Why not peft's mixed-batch forward (`adapter_names=` in peft/tuners/lora/layer.py `_mixed_batch_forward`):
it gives each sample ONE adapter at the scale set on the layer, while a request here is a weighted SET
(style:0.7,subject:0.3), and the same adapter appears at other weights in other samples; it would need one
peft adapter per distinct (set, weights) made and injected per batch, one matmul pair per sub-batch, and
diffusers pipelines do not pass `adapter_names` on to the text encoders. Hooks need no change to the model:
the base weights are never touched, and leaving the context removes every hook.

The batch layout. Each layer sees the batch the pipeline gives its model: the text encoders one row per
prompt (SD, SDXL and Flux encode the prompts and the negatives in separate calls of that size); the
denoiser, with classifier-free guidance, the rows doubled as [uncond of every image, cond of every image]
(SD and SDXL concatenate the negatives first; Flux's true CFG makes a second call of one row per image, a
guidance-distilled Flux one call), and with num_images_per_prompt k each prompt's k images consecutively.
So a call of `prompts` rows is prompt j -> set j; any other size must be whole copies of the image rows,
row r -> image r mod (prompts·k) -> prompt (r mod (prompts·k)) // k. The uncond half of an image uses its
image's adapters, as a solo render does. A size that is not such a multiple is refused (MixedBatchError).

Plain LoRA modules only: DoRA re-normalises W0 + ΔW and LyCORIS updates are not a low-rank product, so an
adapter holding either is refused with MixedBatchError; the caller renders those requests one by one, fused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from difflora.adapter.names import live_name
from difflora.adapter.types import Adapter, LoraWeights
from difflora.composition.blocks import block_weight, check_blocks
from difflora.composition.composer import composed_adapters
from difflora.composition.find import adapter_dirs as search_dirs
from difflora.composition.find import find_adapter
from difflora.composition.fit import base_layer, check_compatible, fit_to_modules
from difflora.config.spec import AdapterWeight
from difflora.errors import ConfigError
from difflora.formats.read import load_adapter
from difflora.generation.pipeline import default_size, render
from difflora.models.identity import model_identity

logger = logging.getLogger(__name__)

# One entry of a sample's set: a spec the loader resolves, or an in-memory adapter with its weight (a number,
# or an AdapterWeight for a text-encoder weight or block factors).
SetEntry = AdapterWeight | tuple[Adapter, float | AdapterWeight]
Loader = Callable[
    [str], tuple[Adapter, Path | None]
]  # adapter name -> (adapter, its file), as Composer.set's


class MixedBatchError(ConfigError):
    """What one mixed batch cannot render; the caller renders those requests one by one (fused)."""


@dataclass
class _Slot:
    """One distinct adapter of the batch, fitted to the model's modules."""

    name: str
    adapter: Adapter


@dataclass
class _Layer:
    """One adapted module's gathered tensors: downs [R, in(, k, k)], ups [out, R(, 1, 1)], scales [prompts, R]."""

    module: nn.Module
    down: torch.Tensor
    up: torch.Tensor
    scales: torch.Tensor
    by_batch: dict[int, torch.Tensor] = field(default_factory=dict)  # each row's scales, per call size

    def row_scales(self, batch: int, rows: Callable[[int], list[int]]) -> torch.Tensor:
        """[batch, R]: the scales of each row's prompt, gathered once per call size (on the weights' device,
        so a GPU forward never waits for an index copied from the host)."""
        if batch not in self.by_batch:
            self.by_batch[batch] = self.scales[torch.tensor(rows(batch), device=self.scales.device)]
        return self.by_batch[batch]


class MixedAdapters:
    """A context manager: while inside, prompt i of the pipeline's calls gets `adapter_sets[i]` (an empty set:
    the base). The same adapter in several sets is gathered once. `loader(name)` resolves AdapterWeight
    entries (default: the file in `adapter_dirs`, as the composer finds it). Everything is checked, and the
    hooks built, on construction: a refused batch has touched nothing. The hooks are on the pipeline's own
    modules, so while inside, every call of the pipeline is this batch's (a server renders one call at a time),
    with one prompt per set and `images_per_prompt` the call's num_images_per_prompt: a batch size alone
    cannot tell 2 images per prompt from CFG's two halves."""

    def __init__(
        self,
        pipe: Any,
        adapter_sets: Sequence[Sequence[SetEntry]],
        *,
        loader: Loader | None = None,
        adapter_dirs: Sequence[str | Path] = (),
        images_per_prompt: int = 1,
    ) -> None:
        held = composed_adapters(pipe)
        if held:
            listing = ", ".join(map(str, held))
            raise MixedBatchError(
                f"The pipeline has adapters composed ({listing}); a mixed batch adds to the base weights: "
                "clear its Composer first."
            )
        if not adapter_sets or images_per_prompt < 1:
            raise ConfigError("A mixed batch needs at least one adapter set and images_per_prompt >= 1.")
        self.pipe, self.prompts, self.images_per_prompt = pipe, len(adapter_sets), images_per_prompt
        directories = search_dirs(adapter_dirs)
        read = loader or (lambda name: (load_adapter(path := find_adapter(name, directories)), path))
        self._slots: dict[Any, _Slot] = {}
        self._sets = [self._resolve(entries, read) for entries in adapter_sets]
        self._layers = self._gather()
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ the sets

    def _resolve(self, entries: Sequence[SetEntry], read: Loader) -> list[tuple[Any, AdapterWeight]]:
        """One sample's set as (slot key, spec) pairs; a new adapter is read, checked and fitted once."""
        resolved: list[tuple[Any, AdapterWeight]] = []
        for entry in entries:
            if isinstance(entry, AdapterWeight):
                key, spec = ("name", entry.name), entry
                if key not in self._slots:
                    self._slots[key] = self._checked(spec.name, read(spec.name)[0])
            else:
                adapter, weight = entry
                key = ("object", id(adapter))
                if key not in self._slots:
                    name = adapter.meta.name or f"adapter{len(self._slots)}"
                    self._slots[key] = self._checked(name, adapter)
                name = self._slots[key].name
                spec = weight if isinstance(weight, AdapterWeight) else AdapterWeight(name, float(weight))
            if key in {k for k, _ in resolved}:
                raise MixedBatchError(f"Adapter {spec.name!r} appears twice in one set; give it once.")
            resolved.append((key, spec))
        family = model_identity(self.pipe).model_family
        check_blocks([spec for _, spec in resolved], self.pipe, family)
        return resolved

    def _checked(self, name: str, adapter: Adapter) -> _Slot:
        kinds = adapter.lycoris_kinds + (["DoRA"] if adapter.dora_axes else [])
        if kinds:
            raise MixedBatchError(
                f"Adapter {name!r} holds {'/'.join(kinds)} modules, which a mixed batch cannot apply (not a "
                "plain low-rank update); render its requests one by one, fused."
            )
        check_compatible(adapter, self.pipe, name=name)  # refuses a foreign adapter; warnings are logged
        return _Slot(name, fit_to_modules(adapter, self.pipe))

    # ------------------------------------------------------------------ the gathered tensors

    def _gather(self) -> list[_Layer]:
        """One _Layer per module any adapter of the batch adapts."""
        users: dict[tuple[str, str], list[tuple[Any, LoraWeights]]] = {}
        for key, slot in self._slots.items():
            for module_key, weights in slot.adapter.modules.items():
                component, _, classic = module_key.partition(".")
                live = live_name(component, classic, getattr(self.pipe, component))
                users.setdefault((component, live), []).append((key, weights))  # type: ignore[arg-type]
        return [self._layer(target, found) for target, found in users.items()]

    def _layer(self, target: tuple[str, str], found: list[tuple[Any, LoraWeights]]) -> _Layer:
        component, live = target
        module = base_layer(getattr(self.pipe, component).get_submodule(live))
        _check_module(module, target)
        weight = module.weight  # type: ignore[union-attr]
        offsets, start = {}, 0
        for key, weights in found:
            offsets[key], start = (start, weights.rank), start + weights.rank
        scales = torch.zeros(self.prompts, start, dtype=torch.float64)  # checked once cast
        family = model_identity(self.pipe).model_family
        by_key = dict(found)
        for sample, entries in enumerate(self._sets):
            for key, spec in entries:
                if key in offsets:
                    first, rank = offsets[key]
                    factor = block_weight(spec, self.pipe, component, live, family) * by_key[key].scale
                    scales[sample, first : first + rank] = factor
        if not bool(torch.isfinite(scales.to(weight.dtype)).all()):
            raise MixedBatchError(
                f"An adapter weight of this batch overflows {str(weight.dtype).removeprefix('torch.')} in "
                f"{component} module {live} (largest scale {float(scales.abs().max()):g}); lower the weights."
            )

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(weight.device, weight.dtype)

        down = cast(torch.cat([weights.down for _, weights in found]))
        up = cast(torch.cat([weights.up for _, weights in found], dim=1))
        return _Layer(module, down, up, cast(scales))

    # ------------------------------------------------------------------ the hooks

    def __enter__(self) -> MixedAdapters:
        try:
            for layer in self._layers:
                self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise
        logger.debug("mixed batch: %d sets, %d layers hooked", self.prompts, len(self._layers))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook: the pipeline is the base pipeline again (its weights were never changed)."""
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, layer: _Layer) -> Callable[..., torch.Tensor]:
        def add_update(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return output + _low_rank(module, x, layer, layer.row_scales(x.shape[0], self.rows))

        return add_update

    def rows(self, batch: int) -> list[int]:
        """The prompt (index into the sets) of each row of a call with `batch` rows (see the module docstring)."""
        return sample_rows(batch, self.prompts, self.images_per_prompt)


def sample_rows(batch: int, prompts: int, images_per_prompt: int = 1) -> list[int]:
    """Row -> prompt for a call of `batch` rows: a text encoder's (one row per prompt), or whole copies of the
    image rows (CFG's uncond and cond halves), each prompt's images consecutive."""
    if batch == prompts:
        return list(range(prompts))
    images = prompts * images_per_prompt
    if batch % images:
        raise MixedBatchError(
            f"A layer was called with {batch} rows for {prompts} prompts x {images_per_prompt} images, which "
            "is not whole copies of the batch: this pipeline's layout is unknown; render one by one."
        )
    return [(row % images) // images_per_prompt for row in range(batch)]


def _check_module(module: nn.Module, target: tuple[str, str]) -> None:
    plain_conv = isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
    if not (isinstance(module, nn.Linear) or plain_conv):
        raise MixedBatchError(
            f"{target[0]} module {target[1]} is a {type(module).__name__}, which a mixed batch cannot adapt "
            "(Linear and plain Conv2d only); render one by one, fused."
        )


def _low_rank(module: nn.Module, x: torch.Tensor, layer: _Layer, scales: torch.Tensor) -> torch.Tensor:
    """((x·A_catᵀ) ⊙ per-row scales)·B_catᵀ, for a Linear ([batch, ..., in]) or a Conv2d ([batch, in, h, w],
    the down with the module's stride, padding and dilation, the up a 1x1 conv)."""
    if isinstance(module, nn.Conv2d):
        hidden = F.conv2d(x, layer.down, None, module.stride, module.padding, module.dilation)
        return F.conv2d(hidden * scales[:, :, None, None], layer.up)
    hidden = F.linear(x, layer.down)
    return F.linear(hidden * scales.view(x.shape[0], *([1] * (x.ndim - 2)), -1), layer.up)


def render_mixed(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    adapter_sets: Sequence[Sequence[SetEntry]],
    *,
    loader: Loader | None = None,
    adapter_dirs: Sequence[str | Path] = (),
    **settings: Any,
) -> list[Any]:
    """One image per (prompt, seed, adapter set), all in one pipeline call under MixedAdapters;
    `settings` are `difflora.generation.pipeline.render`'s (its batch_pixels is set here: one call)."""
    if not len(prompts) == len(seeds) == len(adapter_sets):
        raise ConfigError(
            f"render_mixed(): {len(prompts)} prompts, {len(seeds)} seeds, {len(adapter_sets)} adapter sets; "
            "give one of each per image."
        )
    default_w, default_h = default_size(pipe)
    width, height = settings.get("width") or default_w, settings.get("height") or default_h
    settings = settings | {"batch_pixels": len(prompts) * width * height}
    with MixedAdapters(pipe, adapter_sets, loader=loader, adapter_dirs=adapter_dirs):
        return render(pipe, prompts, seeds=seeds, **settings)
