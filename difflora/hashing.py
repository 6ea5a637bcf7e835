"""Content hashes that key caches and tell base models apart, computed one way everywhere."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch


def sha256_json(value: Any) -> str:
    """The SHA-256 of `value` as canonical JSON (sorted keys; non-JSON values by their str())."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(modules: Mapping[str, torch.nn.Module], *, sample: int = 256) -> str:
    """A hash of modules' weights that is cheap even for multi-GB models: every tensor's name and shape,
    plus its first and last `sample` values (at bfloat16 precision). Two different fine-tunes differ there; hashing every
    byte of a 2 GB model on each load would cost seconds for no practical gain. LoRA layers injected at run
    time are not part of the base and are skipped."""
    digest = hashlib.sha256()
    for name, module in modules.items():
        for key, tensor in sorted(module.state_dict().items()):
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer", "")
            # Sampled at bfloat16 precision, so the same weights loaded in float32 or bfloat16 (or in float16
            # from a float16 file, as most checkpoints are stored) give the same hash: a model trained with
            # --mixed-precision bf16 is the base an adapter was made for when generate loads it in float32.
            flat = tensor.detach().reshape(-1)
            head = flat[:sample].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes()
            tail = flat[-sample:].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes()
            digest.update(f"{name}.{key}:{tuple(tensor.shape)}".encode())
            digest.update(head)
            digest.update(tail)
    return digest.hexdigest()[:16]
