"""The serving engine: the base model loaded once, one request at a time on it, each with its own adapters.

A request (a validated GenerateConfig) names adapters in the CLI grammar, parsed once by its config. Under
the engine's lock, its adapters are found in the server's adapter folders (difflora.composition.find, names
only, never paths: a client must not make the server read arbitrary files) and taken from the AdapterCache
or read. The engine's Composer checks every new one against the model before the set changes, so an
unknown, broken or foreign adapter is refused before any weight changes, then makes the composed set
exactly the request's, in the request's order: the weights a request renders with depend only on its spec,
never on what the previous request had (fused mode re-computes W0 + Σ wᵢ·ΔWᵢ from the kept W0, so nothing
drifts however many requests pass). Its PNGs say how they were made in the words `difflora generate` uses.

The composition mode is a deployment choice (`--mode`); the default, fused, comes from measurement (the
numbers are in the comment on ServeConfig.mode).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflora.composition.composer import Composer, Mode, compose
from difflora.composition.find import adapter_dirs, available_adapters, find_adapter
from difflora.composition.mixed import MixedBatchError, render_mixed
from difflora.config.generate import GenerateConfig
from difflora.config.serve import ServeConfig
from difflora.config.spec import AdapterWeight
from difflora.errors import ConfigError
from difflora.formats.read import load_adapter
from difflora.generation.generate import image_record, render_settings, trained_with_zero_terminal_snr
from difflora.generation.pipeline import default_size, png_bytes, render
from difflora.models.identity import model_identity
from difflora.serving.cache import AdapterCache, CacheEntry
from difflora.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# From this many adapter sets in a batch, one mixed call; fewer render one fused batch per set (a mixed call
# of 8 images with 8 sets took 0.74x the time of 8 fused renders here, BENCHMARKS.md; with 2 sets, 2 fused
# calls of 4 lose little against one of 8 and stay exact against `difflora generate`'s weights).
MIXED_MIN_SETS = 3


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (ServeConfig's max_size, max_steps, max_images)."""

    max_size: int = ServeConfig.max_size
    max_steps: int = ServeConfig.max_steps
    max_images: int = ServeConfig.max_images


@dataclass(frozen=True)
class RenderedImage:
    png: bytes
    parameters: str
    seed: int


@dataclass(frozen=True)
class Ticket:
    """A request checked against this server and ready to render: its config, its seed (drawn now when the
    request gave none), its adapter spec, and when it arrived (perf_counter), for its queue time."""

    request: GenerateConfig
    seed: int
    adapters: tuple[AdapterWeight, ...]
    arrived: float

    @property
    def images(self) -> int:
        return self.request.num_images


@dataclass
class Result:
    images: list[RenderedImage]
    adapters: list[AdapterWeight]
    timings: dict[str, float] = field(default_factory=dict)  # queue, compose, render (seconds)


class Engine:
    """One pipeline, its Composer and the adapter cache. `generate` and `render_group` are safe to call from
    many threads: one batch at a time is on the model (the server calls them from its scheduler's thread). With `reload_each_request`, every request reads its
    adapters from disk and composes them from scratch (the naive server scripts/bench_serve.py compares
    against)."""

    def __init__(
        self,
        pipe: Any,
        *,
        adapter_dir: Sequence[str] = (),
        cache_bytes: int = int(ServeConfig.cache_mb * 2**20),
        mode: Mode = ServeConfig.mode,
        limits: Limits | None = None,
        reload_each_request: bool = False,
        metrics: ServerMetrics | None = None,
        mix_sets: bool = True,
    ) -> None:
        self.pipe = pipe
        self.mix_sets = mix_sets  # requests with different adapter sets may share a batch (mixed forward)
        self.directories = adapter_dirs(adapter_dir)
        self.limits = limits or Limits()
        self.reload_each_request = reload_each_request
        self.metrics = metrics or ServerMetrics()
        # the cache holds adapters as read: the composer checks and fits each as it joins the composed set
        self.cache = AdapterCache(
            0 if reload_each_request else cache_bytes, lambda _, path: load_adapter(path)
        )
        self.metrics.watch(self._readings)
        self.composer: Composer = compose(pipe, (), mode=mode, adapter_dirs=adapter_dir)
        self.identity = self.composer.identity
        self._composed: dict[str, tuple[Path, tuple[int, int]]] = {}  # name -> (file, stamp) composed
        self._lock = threading.Lock()
        self.busy = False

    @classmethod
    def from_config(cls, config: ServeConfig, *, pipe: Any = None, **options: Any) -> Engine:
        """The engine `difflora serve` runs: `config`'s base model loaded once (or `pipe`, already loaded)."""
        if pipe is None:
            import torch

            from difflora.models.dit_files import ComponentFiles
            from difflora.models.loading import load_pipeline

            device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
            files = ComponentFiles(config.clip_l, config.t5, config.vae, config.clip_g, config.text_encoder)
            pipe = load_pipeline(
                config.model, device=device, prediction_type=config.prediction_type, files=files
            )
        limits = Limits(config.max_size, config.max_steps, config.max_images)
        cache_bytes = int(config.cache_mb * 2**20)
        return cls(
            pipe,
            adapter_dir=config.adapter_dir,
            cache_bytes=cache_bytes,
            mode=config.mode,
            limits=limits,
            **options,
        )

    @property
    def mode(self) -> str:
        return self.composer.mode

    # ------------------------------------------------------------------ requests

    def generate(self, request: GenerateConfig) -> Result:
        """Render `request` with its adapters (and only those). Raises DiffloraError subclasses for
        everything the client can fix, before the model is touched."""
        return self.render_group([self.prepare(request)])[0]

    def prepare(self, request: GenerateConfig) -> Ticket:
        """`request` checked against this server's limits and adapter folders (422/404 now, so that a bad
        request never joins a batch), with its seed drawn."""
        self.check_limits(request)
        specs = tuple(request.adapter_weights)
        for spec in specs:
            self.find(spec.name)
        seed = request.seed if request.seed is not None else random.randrange(2**31)
        return Ticket(request, seed, specs, time.perf_counter())

    def batch_key(self, ticket: Ticket) -> Hashable:
        """Tickets with equal keys may be rendered in one `render_group` call: the settings one render() call
        shares (size, steps, sampler, guidance, negative prompt, the family's options), and, unless the
        engine mixes sets, the same adapter set (names, weights and blocks, in order)."""
        settings = render_settings(ticket.request)
        del settings["prompt"]  # each image has its own
        shared = tuple(sorted(settings.items()))
        return shared if self.mix_sets else (ticket.adapters, shared)

    def render_group(self, tickets: Sequence[Ticket]) -> list[Result]:
        """Render `tickets` (equal `batch_key`s), one Result per ticket, in order. One adapter set: composed
        (fused), one render() call. Several sets: from MIXED_MIN_SETS on, one mixed call (each image with its
        own set's updates, difflora.composition.mixed); fewer, or a batch a mixed call cannot take, one fused
        call per set. A single ticket renders exactly as `difflora generate` does; a batched call's CPU kernels
        may differ from the single call's in the last bit (tests/test_serve_queue.py states the bound)."""
        sets = list(dict.fromkeys(ticket.adapters for ticket in tickets))
        if len(sets) >= MIXED_MIN_SETS:
            try:
                return self._render_mixed(tickets)
            except (
                MixedBatchError
            ) as refusal:  # DoRA, LyCORIS, mixed zero-SNR schedules...: one set at a time
                logger.debug("mixed batch refused, rendering per adapter set: %s", refusal)
        if len(sets) == 1:
            return self._render_fused(tickets)
        results: dict[int, Result] = {}
        for chosen in sets:
            group = [i for i, ticket in enumerate(tickets) if ticket.adapters == chosen]
            results.update(zip(group, self._render_fused([tickets[i] for i in group]), strict=True))
        return [results[i] for i in range(len(tickets))]

    def _render_fused(self, tickets: Sequence[Ticket]) -> list[Result]:
        specs = list(tickets[0].adapters)
        with self._lock:
            self.busy = True
            try:
                started = time.perf_counter()
                self._compose(specs)
                composed = time.perf_counter()
                images = self._render(tickets)
                done = time.perf_counter()
            finally:
                self.busy = False
        self.metrics.batches.inc(mode="fused")
        return self._results(tickets, images, (started, composed, done))

    def _render_mixed(self, tickets: Sequence[Ticket]) -> list[Result]:
        """Every ticket's images in one pipeline call, each with its own adapter set's updates."""
        with self._lock:
            self.busy = True
            try:
                started = time.perf_counter()
                entries = self._entries([spec for ticket in tickets for spec in ticket.adapters])
                zero_snr = {_zero_snr(entries, ticket.adapters) for ticket in tickets}
                if len(zero_snr) > 1:
                    raise MixedBatchError("the sets need different sampler schedules (zero terminal SNR)")
                self.composer.clear()  # the mixed forward adds each set's updates to the base weights
                self._composed.clear()
                composed = time.perf_counter()
                images = self._render(tickets, entries=entries, zero_snr=zero_snr.pop())
                done = time.perf_counter()
            finally:
                self.busy = False
        self.metrics.batches.inc(mode="mixed")
        return self._results(tickets, images, (started, composed, done))

    def _results(
        self, tickets: Sequence[Ticket], images: list[list[RenderedImage]], times: tuple[float, float, float]
    ) -> list[Result]:
        started, composed, done = times
        results = []
        for ticket, rendered in zip(tickets, images, strict=True):
            timings = {
                "queue": started - ticket.arrived,
                "compose": composed - started,
                "render": done - composed,
            }
            self.metrics.queue.observe(timings["queue"])
            results.append(Result(rendered, list(ticket.adapters), timings))
        self.metrics.compose.observe(composed - started)
        self.metrics.render.observe(done - composed)
        self.metrics.images.inc(sum(len(r) for r in images))
        return results

    def check_limits(self, request: GenerateConfig) -> None:
        """This server's limits (each message names the limit and its flag), on top of GenerateConfig's
        own validation."""
        limits, problems = self.limits, []
        native = model_identity(self.pipe).model_family.default_pixels(self.pipe)
        for name in ("width", "height"):
            value = getattr(request, name) or native
            if value > limits.max_size:
                problems.append(
                    f"{name} {value} is over this server's limit of {limits.max_size} (--max-size)"
                )
        if request.steps > limits.max_steps:
            problems.append(
                f"steps {request.steps} is over this server's limit of {limits.max_steps} (--max-steps)"
            )
        if request.num_images > limits.max_images:
            problems.append(
                f"num_images {request.num_images} is over this server's limit of {limits.max_images} "
                "(--max-images)"
            )
        if problems:
            raise ConfigError("Request over the server's limits: " + "; ".join(problems) + ".")

    def _readings(self) -> list[tuple[str, str, str, float]]:
        """The cache's counters and the model's state, for GET /metrics (read at each scrape)."""
        stats = self.cache.stats()
        return [
            ("difflora_adapter_cache_hits_total", "counter", "Adapter cache hits.", stats.hits),
            ("difflora_adapter_cache_misses_total", "counter", "Adapters read from disk.", stats.misses),
            ("difflora_adapter_cache_evictions_total", "counter", "Adapters evicted (LRU).", stats.evictions),
            ("difflora_adapter_cache_bytes", "gauge", "Bytes of adapters in the cache.", stats.nbytes),
            (
                "difflora_adapter_cache_capacity_bytes",
                "gauge",
                "The cache's bound (--cache-mb).",
                stats.capacity,
            ),
            ("difflora_adapter_cache_entries", "gauge", "Adapters in the cache.", stats.entries),
            ("difflora_busy", "gauge", "1 while a request is on the model.", int(self.busy)),
        ]

    # ------------------------------------------------------------------ adapters

    def find(self, name: str) -> Path:
        """The file of adapter `name` in the adapter folders. Paths are refused (422), unknown names get
        the closest available ones (404)."""
        return find_adapter(name, self.directories, allow_paths=False)

    def available(self) -> dict[str, Path]:
        return available_adapters(self.directories)

    def _entries(self, specs: Sequence[AdapterWeight]) -> dict[str, CacheEntry]:
        return {spec.name: self.cache.get(spec.name, self.find(spec.name)) for spec in specs}

    def _compose(self, specs: list[AdapterWeight]) -> None:
        entries = self._entries(specs)
        if self.reload_each_request:
            self.composer.clear()
            self._composed.clear()
        present = {spec.name for spec in self.composer.adapters}
        for name, (path, stamp) in list(self._composed.items()):
            entry = entries.get(name)
            if entry is not None and (entry.path, entry.stamp) != (path, stamp) and name in present:
                self.composer.remove(name)  # retrained in place: compose the new file, not the old one
            if entry is None or (entry.path, entry.stamp) != (path, stamp):
                del self._composed[name]
        if self.composer.adapters == specs:
            return  # the same set at the same weights: nothing to do (the common case of a busy style)
        try:
            self.composer.set(specs, loader=lambda name: (entries[name].adapter, entries[name].path))
        finally:  # what is composed now, even if set() stopped half-way
            composed = [spec.name for spec in self.composer.adapters if spec.name in entries]
            self._composed = {name: (entries[name].path, entries[name].stamp) for name in composed}
            self.composer.warnings.clear()  # check_compatible logged them; a server must not pile them up

    # ------------------------------------------------------------------ rendering

    def _render(
        self,
        tickets: Sequence[Ticket],
        *,
        entries: dict[str, CacheEntry] | None = None,
        zero_snr: bool | None = None,
    ) -> list[list[RenderedImage]]:
        """Each ticket's images, from one render() call over all their (prompt, seed) pairs: on the composed
        model, or with `entries` (the adapters by name) each image with its own ticket's set."""
        settings = render_settings(tickets[0].request)  # what difflora generate renders with and records
        del settings["prompt"]
        prompts, seeds, sets = [], [], []
        for ticket in tickets:
            seeds += [ticket.seed + i for i in range(ticket.images)]
            prompts += [ticket.request.prompt] * ticket.images
            sets += [list(ticket.adapters)] * ticket.images
        if zero_snr is None:
            zero_snr = trained_with_zero_terminal_snr(self.composer)
        if entries is None:
            width, height = default_size(self.pipe)
            pixels = (settings["width"] or width) * (settings["height"] or height)
            batch_pixels = pixels * len(prompts) if len(tickets) > 1 else 0  # alone: one image per call
            rendered = render(self.pipe, prompts, seeds=seeds, zero_terminal_snr=zero_snr,
                              batch_pixels=batch_pixels, **settings)  # fmt: skip
        else:
            loader = lambda name: (entries[name].adapter, entries[name].path)  # noqa: E731
            rendered = render_mixed(self.pipe, prompts, seeds, sets, loader=loader, zero_terminal_snr=zero_snr,
                                    **settings)  # fmt: skip
        images = iter(rendered)
        results = []
        for ticket in tickets:
            rendered_images = []
            for i in range(ticket.images):
                image, seed = next(images), ticket.seed + i
                _, parameters = image_record(
                    ticket.request, self.composer, image, seed, adapters=ticket.adapters
                )
                rendered_images.append(
                    RenderedImage(png_bytes(image, parameters=parameters), parameters, seed)
                )
            results.append(rendered_images)
        return results


def _zero_snr(entries: dict[str, CacheEntry], specs: Sequence[AdapterWeight]) -> bool:
    """Whether a set holds an adapter trained on the zero-terminal-SNR schedule (it renders with it)."""
    flag = "difflora.train.zero_terminal_snr"
    return any(entries[spec.name].adapter.meta.extra.get(flag) == "True" for spec in specs)
