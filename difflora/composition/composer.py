"""Composing saved adapters on a model: exact, additive, and reversible.

The contract. For every adapted module (a Linear or Conv2d weight W0 of the UNet or a text encoder),
with adapters i = 1..n applied at weights wᵢ:

    W = W0 + Σᵢ wᵢ · (αᵢ / rᵢ) · Bᵢ · Aᵢ

where Aᵢ = lora_A (down, [rᵢ, in]), Bᵢ = lora_B (up, [out, rᵢ]), αᵢ and rᵢ are adapter i's alpha and rank
*for that module* (adapters may differ in rank, alpha and target modules), and wᵢ is adapter i's weight:
its UNet weight for UNet modules, its text-encoder weight for text-encoder modules. The sum runs over the
adapters that adapt that module; a module adapted by none keeps W0 exactly.

Two modes compute the same W (tests/test_compose_exact.py checks both against this formula, computed from
the tensors read out of the files):

* fused (default): Σ wᵢ ΔWᵢ is computed in float32 and written into the weights once, always from a kept
  copy of the original W0 — never by subtracting a previous update — so re-weighting, adding or removing
  adapters never drifts (diffusers' `unfuse_lora` does: #5604, #5170), weight 0 restores W0 bit for bit,
  and generating costs exactly what the base model costs. Each adapter's ΔWᵢ is computed once (float32,
  while it fits `delta_cache_bytes`), so re-weighting is a weighted sum and a copy.
* dynamic: each adapter is a peft adapter (difflora.adapter.inject.inject_weights); peft's forward adds
  Σ scalingᵢ · Bᵢ Aᵢ x with scalingᵢ = wᵢ αᵢ / rᵢ. Switching weights only changes scalars, at the price of
  extra matmuls in every forward.

LyCORIS modules (`adapter.lycoris`) enter with their exact ΔWᵢ (fused only; a full module's diff_b: the bias);
per-block weights (`@out=1,in=0`) multiply wᵢ by its module's block factor (`composition.blocks`), both modes.

DoRA adapters (`difflora.adapter.dora`) re-normalise the weight, so they are not additive. Their ΔWᵢ is their
effective update against the *base* weight, ΔWᵢ = mᵢ·Vᵢ/‖Vᵢ‖ − W0 with Vᵢ = W0 + (αᵢ/rᵢ)·Bᵢ·Aᵢ, and the sum
above is kept: at weight 1 alone W is exactly the trained DoRA weight (as peft computes it), at weight w it is
W0 + w·ΔW (ComfyUI's and A1111's strength rule), and several adapters add up in any order. ComfyUI and A1111
chain patches instead, each DoRA patch re-normalising what the earlier ones left; composing a DoRA adapter
with others logs that difference (`report.dora_note`). Fused mode only: peft's dynamic DoRA layers scale the
direction, not the update, so a weight other than 1 would mean something else there.
Before anything touches the model, each adapter is checked against it (`check_compatible`): another
architecture or a module shape that does not fit is refused naming both models; another base hash warns.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft.tuners.lora import LoraLayer

from difflora.adapter.inject import inject_weights, remove_adapter
from difflora.adapter.lycoris import bias_delta
from difflora.adapter.names import live_name
from difflora.adapter.types import COMPONENTS, Adapter
from difflora.composition import fit
from difflora.composition.blocks import block_weight, check_blocks, pipe_blocks
from difflora.composition.find import adapter_dirs as search_dirs
from difflora.composition.find import find_adapter
from difflora.composition.fit import WeightOverflow, base_layer, check_compatible, fit_to_modules
from difflora.composition.report import composition_report, dora_note
from difflora.config.spec import AdapterWeight, adapter_set
from difflora.errors import AdapterSpecError, ConfigError
from difflora.formats.read import load_adapter
from difflora.models.identity import ModelIdentity, model_identity

logger = logging.getLogger(__name__)

Mode = Literal["fused", "dynamic"]
Loader = Callable[[str], tuple[Adapter, Path | None]]  # adapter name -> (adapter, its file)
MODES: tuple[str, ...] = ("fused", "dynamic")
DELTA_CACHE_BYTES = 2 * 1024**3
BIAS = "#bias"  # a target's live name with this suffix is the module's bias (a full LyCORIS module's diff_b)


# ---------------------------------------------------------------------------------------------- composer


@dataclass
class _Entry:
    spec: AdapterWeight
    adapter: Adapter
    key: str  # peft adapter name (dynamic mode): must be a valid ModuleDict key
    path: Path | None = None


@dataclass
class _Composition:
    """What a pipeline's composition holds besides the pipeline: the composed set, the original W0 of every
    weight it changed and the cached updates. It never refers to the pipeline, so it can be kept per
    pipeline (in _COMPOSITIONS) without keeping the pipeline alive."""

    mode: Mode
    identity: ModelIdentity  # fingerprinted before any weight changed
    cache_left: int  # bytes the cached updates may still take
    entries: dict[str, _Entry] = field(default_factory=dict)
    pristine: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, dict[tuple[str, str], torch.Tensor]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    counter: int = 0
    dora_noted: tuple[str, ...] = ()


# A pipeline has one composition, whichever Composer made on it changes it: a second Composer taking the
# fused weights for W0 would make the composed set unrecoverable. Keyed weakly, so it goes with its pipeline.
_COMPOSITIONS: weakref.WeakKeyDictionary[Any, _Composition] = weakref.WeakKeyDictionary()


class Composer:
    """The set of adapters composed on one pipeline, and their weights.

    `load`/`add` adapters, `set_weights` to re-weight, `remove` or `set` to change the set, `clear` to
    return to the base model. Every change leaves the model satisfying the module docstring's contract.
    A Composer made on a pipeline that is already composed takes that composition over (its adapters and
    the original weights they were fused from); made in the other mode, it first returns the pipeline to
    the base model."""

    def __init__(
        self,
        pipe: Any,
        mode: Mode = "fused",
        *,
        adapter_dirs: Sequence[str | os.PathLike] = (),
        delta_cache_bytes: int = DELTA_CACHE_BYTES,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"Unknown composition mode {mode!r}; choose 'fused' or 'dynamic'.")
        self.pipe = pipe
        self.directories = search_dirs(adapter_dirs)
        held = _COMPOSITIONS.get(pipe)
        if held is not None and held.mode != mode:
            Composer(pipe, held.mode).clear()  # the other mode's set goes first, back to the kept W0
            held = None
        self._state = held or _Composition(mode, model_identity(pipe), delta_cache_bytes)
        _COMPOSITIONS[pipe] = self._state
        self.mode, self.identity, self.warnings = mode, self._state.identity, self._state.warnings

    @property
    def _cache_left(self) -> int:
        return self._state.cache_left

    # ------------------------------------------------------------------ the set of adapters

    @property
    def adapters(self) -> list[AdapterWeight]:
        return [entry.spec for entry in self._state.entries.values()]

    def adapter(self, name: str) -> Adapter:
        return self._entry(name).adapter

    def path(self, name: str) -> Path | None:
        return self._entry(name).path

    def load(self, spec: AdapterWeight) -> None:
        """Find the file `spec.name` names, load, check and apply it."""
        check_blocks([spec], self.pipe, self.identity.model_family)
        path = find_adapter(spec.name, self.directories)
        self._add(spec, load_adapter(path), path)
        self._apply()

    def add(
        self,
        adapter: Adapter,
        weight: float = 1.0,
        te_weight: float | None = None,
        *,
        name: str | None = None,
    ) -> None:
        """Apply an in-memory adapter (named `name`, else its metadata name)."""
        name = name or adapter.meta.name or f"adapter{len(self._state.entries)}"
        self._add(AdapterWeight(name, weight, te_weight), adapter, None)
        self._apply()

    def set(self, specs: Sequence[AdapterWeight], *, loader: Loader | None = None) -> None:
        """Make the composed set exactly `specs`, in their order: re-weight those present, load the new,
        drop the others. `loader(name)` -> (adapter, its file or None) supplies the new ones (default: find
        the file in the adapter directories and read it), e.g. from a cache of loaded adapters. Every new
        adapter is read and checked before the set changes: one refused leaves the model as it was."""
        specs = check_blocks(adapter_set(specs), self.pipe, self.identity.model_family)
        wanted = {spec.name for spec in specs}
        read = loader or self._read
        fresh = [spec for spec in specs if spec.name not in self._state.entries]
        new = {spec.name: self._checked(spec, *read(spec.name)) for spec in fresh}
        try:
            for name in [n for n in self._state.entries if n not in wanted]:
                self._remove(name)
            for spec in specs:
                if spec.name in self._state.entries:
                    self._state.entries[spec.name].spec = spec
                else:
                    self._register(spec, *new[spec.name])
            # The spec's order is the order of the sum Σ wᵢ ΔWᵢ (float addition is not associative): the
            # same spec gives the same weights bit for bit, whatever was composed before it.
            self._state.entries = {spec.name: self._state.entries[spec.name] for spec in specs}
        finally:  # a failure half-way (peft injecting a layer): the model matches the adapters registered
            self._apply()

    def _read(self, name: str) -> tuple[Adapter, Path]:
        path = find_adapter(name, self.directories)
        return load_adapter(path), path

    def set_weights(self, specs: Sequence[AdapterWeight]) -> None:
        """Change the weights of adapters already composed (others keep theirs)."""
        for spec in check_blocks(adapter_set(specs), self.pipe, self.identity.model_family):
            self._entry(spec.name).spec = spec
        self._apply()

    def remove(self, name: str) -> None:
        self._entry(name)
        self._remove(name)
        self._apply()

    def clear(self) -> None:
        """Remove every adapter: the model is the base model again, bit for bit."""
        for name in list(self._state.entries):
            self._remove(name)
        self._apply()

    def report(self) -> Any:
        """The composition report (difflora.composition.report) for the current set and weights."""
        pairs = [(entry.spec, entry.adapter) for entry in self._state.entries.values()]
        block = pipe_blocks(self.pipe, self.identity.model_family)
        return composition_report(pairs, base=self._base_weight, block=block)

    def _base_weight(self, key: str) -> torch.Tensor:
        """The base weight W0 of module `key` ("<component>.<classic path>"), as the report measures DoRA by."""
        component, _, classic = key.partition(".")
        target = (component, live_name(component, classic, getattr(self.pipe, component)))
        pristine = self._state.pristine
        return pristine[target] if target in pristine else self._param(target).detach()

    # ------------------------------------------------------------------ bookkeeping

    def _entry(self, name: str) -> _Entry:
        if name not in self._state.entries:
            listing = ", ".join(self._state.entries) or "none"
            raise AdapterSpecError(f"Adapter {name!r} is not composed here (composed: {listing}).")
        return self._state.entries[name]

    def _add(self, spec: AdapterWeight, adapter: Adapter, path: Path | None) -> None:
        self._register(spec, *self._checked(spec, adapter, path))

    def _checked(
        self, spec: AdapterWeight, adapter: Adapter, path: Path | None
    ) -> tuple[Adapter, Path | None]:
        """The adapter fitted to the model's modules, once it is known to fit (the only place that checks)."""
        if spec.name in self._state.entries:
            raise AdapterSpecError(
                f"Adapter {spec.name!r} is already composed; use set_weights to re-weight it."
            )
        fit.check_mode(spec.name, adapter, self.mode)
        self._state.warnings += check_compatible(adapter, self.pipe, name=spec.name)
        return fit_to_modules(adapter, self.pipe), path

    def _register(self, spec: AdapterWeight, adapter: Adapter, path: Path | None) -> None:
        self._state.counter += 1
        entry = _Entry(spec=spec, adapter=adapter, key=f"difflora{self._state.counter}", path=path)
        self._state.entries[spec.name] = entry
        if self.mode == "dynamic":
            for component in adapter.components:
                with warnings.catch_warnings():  # peft warns that a model holds several adapters: intended
                    warnings.simplefilter("ignore", UserWarning)
                    inject_weights(
                        getattr(self.pipe, component),
                        component=component,
                        modules=adapter.component_modules(component),
                        adapter_name=entry.key,
                    )
        logger.debug("composed %s (%d modules, %s mode)", spec, len(adapter.modules), self.mode)

    def _remove(self, name: str) -> None:
        entry = self._state.entries.pop(name)
        # the budget goes back with the deltas, or a long-lived composer (a server) stops caching any
        self._state.cache_left += sum(
            delta.numel() * 4 for delta in self._state.deltas.pop(entry.key, {}).values()
        )
        if self.mode == "dynamic":
            for component in entry.adapter.components:
                remove_adapter(getattr(self.pipe, component), entry.key)

    def _apply(self) -> None:
        if self.mode == "fused":
            try:
                self._apply_fused()
            except WeightOverflow as error:  # the set cannot be composed: the model goes back to the base
                names = ", ".join(map(str, self.adapters))
                self.clear()
                message = f"Composing {names} {error}: lower the weights (nothing is composed now)."
                raise AdapterSpecError(message) from None
        else:
            self._apply_dynamic()
        self._note_dora()

    def _note_dora(self) -> None:
        """Say once per set of adapters that a DoRA adapter among several is composed, and how."""
        names = tuple(self._state.entries)
        dora = [name for name, entry in self._state.entries.items() if entry.adapter.dora_axes]
        if len(names) > 1 and dora and names != self._state.dora_noted:
            message = dora_note(self.adapters, dora)
            logger.warning("%s", message)
            self._state.warnings.append(message)
        self._state.dora_noted = names

    # ------------------------------------------------------------------ fused mode

    def _users(self) -> dict[tuple[str, str], list[tuple[_Entry, str]]]:
        """(component, live module name) -> [(entry, module key in the adapter)] for every adapted module."""
        users: dict[tuple[str, str], list[tuple[_Entry, str]]] = {}
        for entry in self._state.entries.values():
            for key in entry.adapter.modules:
                component, _, classic = key.partition(".")
                live = live_name(component, classic, getattr(self.pipe, component))
                users.setdefault((component, live), []).append((entry, key))
                if bias_delta(entry.adapter.modules[key]) is not None:  # diff_b: a bias target (_delta)
                    users.setdefault((component, live + BIAS), []).append((entry, key))
        return users

    def _apply_fused(self) -> None:
        users = self._users()
        for target in [t for t in self._state.pristine if t not in users]:
            with torch.no_grad():
                self._param(target).copy_(self._state.pristine.pop(target))
        for target, entries in users.items():
            param = self._param(target)
            if target not in self._state.pristine:
                self._state.pristine[target] = param.detach().clone()
            w0 = self._state.pristine[target]
            weights = [(e, k, self._weight(e.spec, target)) for e, k in entries]
            active = [(e, k, w) for e, k, w in weights if w]
            with torch.no_grad():
                if not active:
                    param.copy_(w0)
                    continue
                total = w0.to(torch.float32, copy=True)
                for entry, key, weight in active:
                    total.add_(self._delta(entry, key, target, param), alpha=weight)
                fit.check_representable(total, param.dtype, target)
                param.copy_(total)

    def _weight(self, spec: AdapterWeight, target: tuple[str, str]) -> float:
        """wᵢ for this module: the adapter's weight times its block's factor (`composition.blocks`)."""
        family = self.identity.model_family
        return block_weight(spec, self.pipe, target[0], target[1].removesuffix(BIAS), family)

    def _param(self, target: tuple[str, str]) -> torch.Tensor:
        component, live = target
        module = getattr(self.pipe, component).get_submodule(live.removesuffix(BIAS))
        return base_layer(module).bias if live.endswith(BIAS) else base_layer(module).weight

    def _delta(self, entry: _Entry, key: str, target: tuple[str, str], param: torch.Tensor) -> torch.Tensor:
        cached = self._state.deltas.get(entry.key, {}).get(target)
        if cached is not None:
            return cached
        # a DoRA module's update is computed against the kept original weight, never a fused one
        w0, weights = self._state.pristine[target], entry.adapter.modules[key]
        update = bias_delta(weights) if target[1].endswith(BIAS) else weights.delta(w0)
        delta = update.to(param.device).reshape(param.shape)  # type: ignore[union-attr]
        if self._state.cache_left >= delta.numel() * 4:
            self._state.cache_left -= delta.numel() * 4
            self._state.deltas.setdefault(entry.key, {})[target] = delta
        return delta

    # ------------------------------------------------------------------ dynamic mode

    def _apply_dynamic(self) -> None:
        keys = {entry.key: entry for entry in self._state.entries.values()}
        for component in COMPONENTS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for live, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
                ours = [k for k in keys if k in layer.lora_A]
                for key in ours:
                    layer.set_scale(key, self._weight(keys[key].spec, (component, live)))
                others = [a for a in layer.active_adapters if a not in keys and not a.startswith("difflora")]
                layer.set_adapter(others + ours, inference_mode=True)


# ---------------------------------------------------------------------------------------------- entry point


def composed_adapters(pipe: Any) -> list[AdapterWeight]:
    """The adapters composed on `pipe` (either mode), in their order; [] when its weights are the base's."""
    return [entry.spec for entry in held.entries.values()] if (held := _COMPOSITIONS.get(pipe)) else []


def compose(
    pipe: Any,
    adapters: Sequence[AdapterWeight] = (),
    *,
    mode: Mode = "fused",
    adapter_dirs: Sequence[str | os.PathLike] = (),
) -> Composer:
    """Compose adapters (`parse_adapter_weights("style:0.7,subject:0.3")`) on `pipe` and return a Composer
    of the pipeline's composition. Composing again replaces the previous set (from the kept original
    weights, never on top of fused ones)."""
    composer = Composer(pipe, mode, adapter_dirs=adapter_dirs)
    composer.set(adapters)
    return composer
