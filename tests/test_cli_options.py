"""Every command's flags are generated from its config dataclass: each field has a flag, each flag is a field,
and the default `--help` shows is the dataclass's own, so a default can never again be written twice."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from difflora.cli import cli
from difflora.config import field_help
from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.merge import MergeConfig
from difflora.config.train import TrainConfig
from tests.support.cli import expected_default, help_lines

# command -> (its config dataclass, the field given as the positional argument)
COMMANDS = {
    "train": (TrainConfig, "data_dir"),
    "generate": (GenerateConfig, "prompt"),
    "merge": (MergeConfig, "adapters"),
    "export": (ExportConfig, "adapter"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_is_a_flag_and_every_flag_a_field(command):
    cls, positional = COMMANDS[command]
    params = cli.commands[command].params
    options = {p.name: p for p in params if isinstance(p, click.Option)}
    arguments = [p.name for p in params if isinstance(p, click.Argument)]
    names = {field.name for field in dataclasses.fields(cls)}
    assert arguments == [positional]
    assert set(options) - {"config_file", "help"} == names - {positional}
    for name in names - {positional}:
        assert options[name].default is None, f"--{name} must default to None so the config can tell"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_default_shown_is_the_dataclass_default(command):
    cls, positional = COMMANDS[command]
    lines = help_lines(command)
    options = {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}
    for field in dataclasses.fields(cls):
        if field.name == positional:
            continue
        text = lines[options[field.name].opts[0]]
        shown = re.findall(r"\[default: ([^\]]*)\]", text)
        expected = expected_default(field)
        assert shown == ([expected] if expected is not None else []), (field.name, text)
        assert text.startswith(field_help(cls)[field.name]), field.name


def test_flag_names_and_aliases_stay():
    expected = {
        "train": ["--config", "--rank", "--flip", "--no-flip", "--sample-prompts", "--mixed-precision"],
        "generate": ["--adapters", "--adapter", "--adapter-dir", "-n", "--num-images", "-o", "--out",
                     "--fuse", "--no-fuse", "--report", "--sweep", "--scheduler", "--config"],
        "merge": ["-o", "--output", "--rank", "--adapter-dir", "--config"],
        "export": ["-o", "--output", "--format", "--dtype", "--overwrite", "--config"],
    }  # fmt: skip
    for command, flags in expected.items():
        lines = help_lines(command)
        assert set(flags) <= set(lines), (command, set(flags) - set(lines))
    assert "--no-report" not in help_lines("generate") and "--no-overwrite" not in help_lines("export")


def test_choices_come_from_the_code():
    from difflora.config.schedulers import SCHEDULER_NAMES

    result = CliRunner().invoke(cli, ["generate", "--help"], terminal_width=10_000, max_content_width=10_000)
    assert f"--scheduler [{'|'.join(SCHEDULER_NAMES)}]" in result.output
    export_help = CliRunner().invoke(cli, ["export", "--help"]).output
    assert "--format [comfyui|diffusers]" in export_help and "--dtype [fp16|bf16|fp32]" in export_help


def test_generate_flags_override_the_file_and_adapter_flags_combine(monkeypatch, tmp_path):
    import difflora.generation.generate as generation

    seen: list[GenerateConfig] = []
    monkeypatch.setattr(generation, "generate", lambda config, **_: seen.append(config) or [])
    path = tmp_path / "gen.toml"
    path.write_text('[generate]\nsteps = 7\nguidance = 2.0\nreport = true\nadapters = ["x:0.5"]\n')
    args = ["generate", "a cat", "--config", str(path), "--steps", "3", "--adapters", "a:0.5,b",
            "--adapter", "c:-1", "-n", "2", "--no-fuse"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.prompt, config.steps, config.guidance, config.num_images) == ("a cat", 3, 2.0, 2)
    assert config.adapters == ("a:0.5,b", "c:-1") and config.fuse is False and config.report is True
    assert config.scheduler == GenerateConfig.scheduler and config.out == GenerateConfig.out


def test_a_field_without_a_docstring_is_refused():
    @dataclass
    class Undocumented:
        documented: int = 1
        """Has help."""
        bare: int = 2

    with pytest.raises(TypeError, match=r"Undocumented fields without a docstring.*bare"):
        field_help(Undocumented)
