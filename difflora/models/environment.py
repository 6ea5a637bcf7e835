"""`difflora env`: the facts a bug report needs, gathered without loading a model.

Versions come from the installed distributions' metadata (importlib.metadata), so a library that fails to
import still shows its version; torch is imported, since its build (CUDA, ROCm, MPS) and devices are only
known at run time.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata

from difflora import __version__

LIBRARIES: tuple[str, ...] = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "safetensors",
    "huggingface_hub",
    "pillow",
)


@dataclass(frozen=True)
class Device:
    name: str  # "cpu", "cuda:0", "mps"
    description: str  # the CPU's or the GPU's model
    memory_gib: float | None  # total memory (the machine's RAM for the CPU); None where unknown
    bf16: bool
    fp16: bool


@dataclass(frozen=True)
class Environment:
    difflora: str
    python: str
    platform: str
    versions: dict[str, str]  # distribution -> version, or "not installed"
    torch_build: str  # "CPU", "CUDA 12.4", "ROCm 6.1", with "+MPS" where built for it
    devices: list[Device]
    threads: int
    cpu_count: int
    caches: dict[str, str] = field(default_factory=dict)  # what -> folder

    def text(self) -> str:
        lines = [
            f"{'difflora':<16} {self.difflora}",
            f"{'python':<16} {self.python}",
            f"{'platform':<16} {self.platform}",
        ]
        lines += [f"{name:<16} {version}" for name, version in self.versions.items()]
        lines.append(f"{'torch build':<16} {self.torch_build}")
        lines.append(f"{'threads':<16} {self.threads} torch threads of {self.cpu_count} CPUs")
        lines.append("devices:")
        for device in self.devices:
            memory = f"{device.memory_gib:.1f} GiB" if device.memory_gib is not None else "memory unknown"
            half = f"bf16 {_yes(device.bf16)}, fp16 {_yes(device.fp16)}"
            lines.append(f"  {device.name:<14} {device.description} ({memory}; {half})")
        lines.append("cache folders:")
        lines += [f"  {what:<16} {folder}" for what, folder in self.caches.items()]
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def torch_build() -> str:
    import torch

    if getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    elif torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    else:
        build = "CPU"
    mps = getattr(torch.backends, "mps", None)
    return build + ("+MPS" if mps is not None and mps.is_built() else "")


def cpu_device() -> Device:
    import psutil  # accelerate's dependency, so always installed with difflora

    from difflora.training.precision import cpu_lacks_half_precision

    description = cpu_model() or platform.processor() or platform.machine()
    memory = psutil.virtual_memory().total / 2**30
    return Device(
        "cpu", description, memory, not cpu_lacks_half_precision("bf16"), not cpu_lacks_half_precision("fp16")
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); empty elsewhere, where platform's answer is used."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def accelerator_devices() -> list[Device]:
    """Every CUDA/ROCm GPU torch sees, and MPS where it is available."""
    import torch

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            with torch.cuda.device(index):
                bf16 = torch.cuda.is_bf16_supported()
            devices.append(Device(f"cuda:{index}", props.name, props.total_memory / 2**30, bf16, True))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(Device("mps", "Apple GPU", None, True, True))
    return devices


def cache_folders() -> dict[str, str]:
    """Where downloads and difflora's caches go: the hub cache (HF_HOME/HF_HUB_CACHE), torch's, and the
    latent cache a training run uses by default."""
    import torch
    from huggingface_hub import constants

    return {
        "huggingface hub": constants.HF_HUB_CACHE,
        "torch hub": torch.hub.get_dir(),
        "latent cache": "<output-dir>/.cache (or --cache-dir)",
    }


def environment() -> Environment:
    import torch

    return Environment(
        difflora=__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        versions={name: version_of(name) for name in LIBRARIES},
        torch_build=torch_build(),
        devices=[cpu_device(), *accelerator_devices()],
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count() or 1,
        caches=cache_folders(),
    )
