"""`difflora env`: every version it prints is the installed distribution's, and the CPU's facts are the
machine's, read here another way."""

from __future__ import annotations

import json
import os
from importlib import metadata

import torch
from click.testing import CliRunner

from difflora import __version__
from difflora.cli import cli
from difflora.models.environment import LIBRARIES, Device, Environment, accelerator_devices


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def test_env_prints_the_installed_versions_and_build():
    result = CliRunner().invoke(cli, ["env"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"{'difflora':<16} {__version__}" in lines
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert f"{name:<16} {_installed(name)}" in lines
    build = (
        f"ROCm {torch.version.hip}"
        if torch.version.hip
        else (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU")
    )
    assert any(line.startswith(f"{'torch build':<16} {build}") for line in lines)
    assert f"{'threads':<16} {torch.get_num_threads()} torch threads of {os.cpu_count()} CPUs" in lines


def test_env_json_has_the_cpu_memory_and_every_device():
    facts = json.loads(CliRunner().invoke(cli, ["env", "--json"]).output)
    assert set(facts["versions"]) == set(LIBRARIES)
    cpu = facts["devices"][0]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert cpu["name"] == "cpu" and abs(cpu["memory_gib"] - ram) < 0.01
    assert [d["name"] for d in facts["devices"][1:]] == [d.name for d in accelerator_devices()]
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert [d["name"] for d in facts["devices"][1:]][: len(cuda)] == cuda
    assert facts["caches"]["torch hub"] == torch.hub.get_dir()


def test_env_text_lists_devices_with_memory_and_half_precision():
    report = Environment(
        "1.0", "3.11", "Linux", {"torch": "2.13"}, "CUDA 12.4",
        [Device("cuda:0", "NVIDIA H100", 79.6, True, True), Device("mps", "Apple GPU", None, True, False)],
        8, 16, {"torch hub": "/t"},
    )  # fmt: skip
    text = report.text()
    assert "  cuda:0         NVIDIA H100 (79.6 GiB; bf16 yes, fp16 yes)" in text
    assert "  mps            Apple GPU (memory unknown; bf16 yes, fp16 no)" in text
    assert "threads          8 torch threads of 16 CPUs" in text
