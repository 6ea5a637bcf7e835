"""ServeConfig: every knob of `difflora serve`, one field each.

Flag and TOML key names map 1:1 (`--cache-mb` <-> `cache_mb`); the string under a field is its help.
Validation collects every problem into one ConfigError naming the flags. A host other than loopback is
refused without a token: the server renders with whatever model and adapters it was given, for anyone who
can reach it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from difflora.config import Problems, coerce_to_tuples
from difflora.config.limits import MAX_IMAGES, MAX_SIZE, MAX_STEPS, out_of_range

TOKEN_ENV = "DIFFLORA_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs --token."""
    port: int = 8000
    """TCP port to listen on."""
    model: str | None = None
    """Base model, loaded once: a diffusers folder, a .safetensors checkpoint or a hub id. Default: the
    embedded model."""
    clip_l: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its CLIP-L text encoder (ComfyUI's clip_l.safetensors)."""
    t5: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its T5-XXL encoder (t5xxl_fp16.safetensors)."""
    vae: str | None = None
    """With a transformer-only Flux.1 or SD3 file as --model: its autoencoder (BFL's ae.safetensors)."""
    clip_g: str | None = None
    """With a transformer-only SD3 / SD3.5 file as --model: its CLIP-G encoder (ComfyUI's clip_g.safetensors)."""
    text_encoder: str | None = None
    """With a Qwen-Image transformer file as --model: its Qwen2.5-VL text encoder (ComfyUI's
    qwen_2.5_vl_7b.safetensors)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the base's UNet predicts (as for `difflora generate`). Default: the model's own."""
    adapter_dir: tuple[str, ...] = ()
    """Folders whose .safetensors adapters requests may name (./adapters always is). Requests name adapters,
    never paths."""
    cache_mb: float = 1024.0
    """Memory for loaded adapters kept between requests, in MiB; the least recently used is evicted first.
    0 keeps none (every request reads its adapters from disk)."""
    token: str | None = None
    """Bearer token required on every route but /health (also read from $DIFFLORA_SERVE_TOKEN, which,
    unlike a flag, other users of the machine cannot read in the process list). Default: no token."""
    # fused by measurement (scripts/bench_serve.py --requests 40 --steps 4 --threads 1; embedded model, 2 shared
    # CPU cores, 2 rank-8 adapters per request, 8 on disk): the same set repeated, fused 5.90 req/s vs dynamic
    # 4.87 (both compose in 0.2 ms; peft's extra matmuls make each render 202 ms instead of 166); a new set
    # every request, fused 5.26 vs 2.79 (composing from the kept W0 takes 11.7 ms, injecting peft layers 144).
    # Fused wins both mixes, and is exact: its image is `difflora generate`'s bit for bit.
    mode: Literal["fused", "dynamic"] = "fused"
    """How a request's adapters are composed: fused re-computes the weights from the kept originals (exact,
    base-model speed); dynamic uses peft's per-adapter forward (cheap to switch, slower to render)."""
    max_size: int = 1024
    """Largest width or height, in pixels, a request may ask for."""
    max_steps: int = 50
    """Most denoising steps a request may ask for."""
    max_images: int = 4
    """Most images one request may ask for."""
    # 64 KiB holds the largest valid request (2 prompts of MAX_PROMPT_CHARS, JSON-escaped) with room to spare
    max_body_kb: int = 64
    """Largest request body, in KiB: a longer one is refused (413) before it is read whole."""
    max_queue: int = 64
    """Most requests waiting for the model; one more is refused at once (503 with Retry-After)."""
    request_timeout: float = 300.0
    """Seconds a request may wait for its turn; one not started by then is answered 504 and leaves the queue."""
    # 15 ms: a lone request waits at most that long for company, a small part of any render (embedded model on
    # CPU 0.1 s and more, a real one on GPU 1 s and more); under load the queue fills while the model works,
    # so a batch forms without waiting at all (scripts/bench_serve_queue.py measures both, BENCHMARKS.md)
    batch_window_ms: float = 15.0
    """Milliseconds a request waits for others with the same adapter set and settings, to render them in
    one batch. 0 renders one request at a time."""
    max_batch: int = 8
    """Most images rendered in one batch (requests with the same adapter set and settings)."""
    shutdown_timeout: float = 30.0
    """Seconds SIGTERM or SIGINT gives the queued requests to render before those left are refused (503) and
    the server exits."""
    device: str | None = None
    """torch device. Default: cuda when available, else cpu."""
    data_root: str | None = None
    """Folder under which the web UI may read and create training datasets and start training runs (never
    outside it). Without it the UI browses and generates but does not train."""

    def __post_init__(self) -> None:
        coerce_to_tuples(self, "adapter_dir")
        p = Problems()
        p.check(0 < self.port < 65536, "port", f"must be between 1 and 65535, got {self.port}")
        p.check(self.cache_mb >= 0, "cache_mb", f"must be 0 or more, got {self.cache_mb}")
        for name, high in (("max_size", MAX_SIZE), ("max_steps", MAX_STEPS), ("max_images", MAX_IMAGES)):
            problem = out_of_range(getattr(self, name), 1, high)  # within what any request may ask
            p.check(problem is None, name, str(problem))
        p.check(
            1 <= self.max_queue <= 100_000, "max_queue", f"must be between 1 and 100000, got {self.max_queue}"
        )
        p.check(1 <= self.max_batch <= 256, "max_batch", f"must be between 1 and 256, got {self.max_batch}")
        seconds = (
            ("request_timeout", 0.01, 86_400.0),
            ("batch_window_ms", 0, 10_000.0),
            ("shutdown_timeout", 0, 3_600.0),
        )
        for name, low, high in seconds:
            problem = out_of_range(getattr(self, name), low, high)
            p.check(problem is None, name, str(problem))
        p.check(self.max_body_kb >= 1, "max_body_kb", f"must be at least 1, got {self.max_body_kb}")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            p.add("data_root", f"{self.data_root} is not a folder; create it or pass an existing one")
        if self.max_size % 8:
            p.add("max_size", f"must be a multiple of 8 (image sizes are), got {self.max_size}")
        if self.token is not None and not self.token.strip():
            p.add("token", "is empty; give a secret string, or leave --token out on loopback")
        if not self.token and not is_loopback(self.host):
            p.add(
                "host",
                f"{self.host} is not a loopback address, so anyone who can reach this machine could "
                f"render with its model. Pass --token SECRET (or set ${TOKEN_ENV}) to require a bearer "
                "token, or listen on 127.0.0.1.",
            )
        p.raise_if_any("serve")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; a hostname that is not `localhost` is taken as reachable from
    outside (what it resolves to can change after the check)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
