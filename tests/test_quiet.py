"""Every line a difflora command writes to stderr is difflora's own: no third-party chatter.

Each command runs in a subprocess, offline, through a small driver that labels where stderr lines come
from: log records get their logger's name, Python warnings their category, and difflora's own
`click.echo(..., err=True)` a label of its own. A line labelled with another library's logger, a warning,
or a line nobody labelled (a library printing straight to stderr) fails the test, naming the command.

The driver also makes bitsandbytes take the path it takes on CPUs with AVX512-BF16, where importing it
(which importing peft does) asks the `kernels` package for a hub kernel and, offline, logs two lines on
every command: the chatter that broke a fresh install's test run on such a machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("check", "export", "generate", "inspect", "merge", "serve", "train")

DRIVER = r"""
import importlib.abc, importlib.machinery, json, logging, sys, warnings

class _AsIfAvx512Bf16(importlib.abc.MetaPathFinder):
    # bitsandbytes.backends.cpu.ops asks has_avx512bf16() when imported: answer yes, as such a CPU does.
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        execute = spec.loader.exec_module
        def exec_module(module):
            execute(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _AsIfAvx512Bf16())

def label(tag, text):
    return "\n".join(f"<{tag}> {line}" for line in str(text).split("\n"))

_format = logging.Formatter.format
logging.Formatter.format = lambda self, record: label(f"log:{record.name}", _format(self, record))
warnings.showwarning = lambda message, category, *rest, **kw: sys.stderr.write(
    f"<warning:{category.__name__}> {message}\n"
)

import click, click.termui, click.utils
_echo = click.utils.echo
def echo(message=None, *args, err=False, **kwargs):
    if err and message:
        message = label("difflora", message)
    return _echo(message, *args, err=err, **kwargs)
click.echo = click.utils.echo = click.termui.echo = echo

from difflora.cli import cli
cli.main(args=json.loads(sys.argv[1]), prog_name="difflora")
"""

# What difflora writes to stderr besides its own log records and echoes: its progress bars (training's
# tqdm and generate's click bar, redrawn with carriage returns).
OWN_UNLABELLED = re.compile(r"^(training:?\s|Generating\b)")


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFLORA_FAULT")}
    env["HF_HUB_OFFLINE"] = "1"
    # matplotlib's config folder as on a fresh machine: its first plot (training's loss.png) scans the
    # fonts and says so, a line that must not reach the user (difflora/chatter.py)
    env["MPLCONFIGDIR"] = str(cwd / "matplotlib-config")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-c", DRIVER, json.dumps(args)]


def foreign_lines(stderr: str) -> list[str]:
    """The stderr lines difflora did not write."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [
        line
        for line in lines
        if line and not line.startswith(("<difflora>", "<log:difflora")) and not OWN_UNLABELLED.match(line)
    ]


def run_quiet(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(args), env=_env(cwd), cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"difflora {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    foreign = foreign_lines(result.stderr)
    assert not foreign, f"difflora {' '.join(args)} let through stderr lines it did not write: {foreign}"
    return result


def test_the_driver_sees_chatter():
    """The labelling itself: a third-party log line, a warning and a bare write are all caught."""
    assert foreign_lines("<log:kernels._internals.hf_hub> Skipping publisher trust check") != []
    assert foreign_lines("<warning:FutureWarning> deprecated") != []
    assert foreign_lines("some library printing") != []
    assert foreign_lines("<difflora> Error: x\n<log:difflora.training> plan\ntraining: 50%|#\r") == []


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: ~10 s
def test_the_python_api_is_quiet_about_torchvision():
    """Loading SDXL or Flux through the Python API makes diffusers look up transformers' image processors,
    which without torchvision (left out of the install on purpose) warn once each."""
    touch = (
        "import difflora, transformers; transformers.CLIPImageProcessor; transformers.SiglipImageProcessor"
    )
    result = subprocess.run([sys.executable, "-c", touch], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_is_quiet(command, tmp_path):
    run_quiet([command, "--help"] if command else ["--help"], tmp_path)


@pytest.mark.slow
def test_every_command_is_quiet(tmp_path):
    """One real run of each command, as a user chains them on the embedded model."""
    data = str(REPO_ROOT / "sample_data" / "style")
    adapters = tmp_path / "adapters"
    steps = [
        ["check", data],
        ["train", data, "--name", "quiet", "--max-steps", "2", "--sample-every", "0", "--output-dir",
         str(adapters), "--cache-dir", str(tmp_path / "cache")],
        ["inspect", str(adapters / "quiet.safetensors")],
        ["export", str(adapters / "quiet.safetensors"), "-o", str(tmp_path / "quiet_kohya.safetensors")],
        ["merge", "quiet:0.5", "--adapter-dir", str(adapters), "-o", str(tmp_path / "merged.safetensors")],
        ["generate", "a red circle", "--adapters", "quiet:1", "--adapter-dir", str(adapters), "--steps",
         "2", "-o", str(tmp_path / "out")],
    ]  # fmt: skip
    for args in steps:
        run_quiet(args, tmp_path)
    assert (tmp_path / "quiet_kohya.safetensors").is_file() and list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_serve_is_quiet(tmp_path):
    port = 18000 + os.getpid() % 1000
    process = subprocess.Popen(
        _command(["serve", "--port", str(port), "--adapter-dir", str(tmp_path)]),
        env=_env(tmp_path),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        health = _wait_for_health(f"http://127.0.0.1:{port}/health", process)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert health
    foreign = foreign_lines(stderr)
    assert not foreign, f"difflora serve let through stderr lines it did not write: {foreign}"


def _wait_for_health(url: str, process: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "difflora serve exited before it answered"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"difflora serve did not answer {url} within {timeout} s")
