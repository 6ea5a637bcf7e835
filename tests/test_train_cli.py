"""`difflora train` flags and --config files: precedence, unknown keys, every field reachable as a flag."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

import difflora.training.trainer as trainer
from difflora.cli import cli
from difflora.config import field_help
from difflora.config.train import TrainConfig


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace training by a recorder: these tests are about turning flags and files into a TrainConfig."""
    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, **_) -> object:
        seen.append(config)
        return tmp_path / "adapter.safetensors"

    monkeypatch.setattr(trainer, "train", fake_train)
    return seen


def test_flags_override_the_file_which_overrides_defaults(captured, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nrank = 4\nlearning_rate = 0.002\nsample_prompts = ["a", "b"]\nflip = true\n')
    result = CliRunner().invoke(
        cli, ["train", "images", "--config", str(path), "--rank", "16", "--no-flip", "--sample-prompts", "c"]
    )
    assert result.exit_code == 0, result.output
    config = captured[0]
    assert config.rank == 16 and config.flip is False and config.sample_prompts == ("c",)  # flags win
    assert config.learning_rate == 0.002  # the file wins over the default
    assert config.batch_size == TrainConfig.batch_size and config.data_dir == "images"  # defaults remain


def test_the_data_folder_may_come_from_the_file(captured, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data_dir = "from_file"\nmax_steps = 10\n')
    assert CliRunner().invoke(cli, ["train", "--config", str(path)]).exit_code == 0
    assert captured[0].data_dir == "from_file" and captured[0].max_steps == 10


def test_unknown_key_is_refused_with_the_nearest_name(captured, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("learnig_rate = 0.1\n")
    result = CliRunner().invoke(cli, ["train", "images", "--config", str(path)])
    assert result.exit_code == 2 and not captured
    assert "unknown key 'learnig_rate'" in result.output and "Did you mean 'learning_rate'" in result.output


def test_invalid_values_are_all_reported_naming_flags(captured):
    result = CliRunner().invoke(cli, ["train", "images", "--rank", "0", "--max-steps", "5", "--epochs", "2"])
    assert result.exit_code == 2 and not captured
    assert "--rank: must be at least 1" in result.output
    assert "--max-steps and --epochs both given" in result.output
    missing = CliRunner().invoke(cli, ["train"])
    assert missing.exit_code == 2 and "--data-dir: give the folder of training images" in missing.output


def test_every_config_field_is_a_flag_with_help():
    help_text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    helps = field_help(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name != "data_dir":
            assert "--" + field.name.replace("_", "-") in help_text
        assert helps[field.name]
    for issue_flag in ("--name", "--output-dir", "--max-steps", "--epochs", "--rank", "--alpha", "--resolution",
                       "--batch-size", "--learning-rate", "--seed", "--save-every", "--resume",
                       "--train-text-encoder", "--trigger", "--model", "--config"):  # fmt: skip
        assert issue_flag in help_text


@pytest.fixture
def captured_many(monkeypatch, tmp_path):
    seen: list[list[TrainConfig]] = []

    def fake_train_many(configs, **_) -> list:
        seen.append(list(configs))
        return [tmp_path / f"{i}.safetensors" for i in range(len(configs))]

    monkeypatch.setattr(trainer, "train_many", fake_train_many)
    return seen


def test_several_folders_train_one_adapter_each_with_the_shared_flags(captured_many):
    result = CliRunner().invoke(cli, ["train", "style", "subject", "--rank", "16"])
    assert result.exit_code == 0, result.output
    (configs,) = captured_many
    assert [c.data_dir for c in configs] == ["style", "subject"] and {c.rank for c in configs} == {16}
    assert result.output.count("Adapter: ") == 2
    refused = CliRunner().invoke(cli, ["train", "style", "subject", "--name", "x"])
    assert refused.exit_code != 0 and "--name names one adapter" in refused.output


def test_adapter_tables_override_the_shared_train_settings(captured_many, tmp_path):
    path = tmp_path / "two.toml"
    path.write_text(
        '[train]\nrank = 4\n\n[[adapter]]\ndata_dir = "style"\n\n'
        '[[adapter]]\ndata_dir = "subject"\nrank = 8\nname = "cross"\n'
    )
    result = CliRunner().invoke(cli, ["train", "--config", str(path), "--seed", "7"])
    assert result.exit_code == 0, result.output
    (configs,) = captured_many
    assert [(c.data_dir, c.rank, c.name, c.seed) for c in configs] == [
        ("style", 4, None, 7),
        ("subject", 8, "cross", 7),
    ]
    path.write_text('[[adapter]]\ndata_dir = "style"\nrnak = 2\n')
    typo = CliRunner().invoke(cli, ["train", "--config", str(path)])
    assert typo.exit_code != 0 and "rank" in typo.output  # unknown keys named with the nearest valid one
