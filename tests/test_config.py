"""Config precedence (defaults < TOML < flags), unknown keys with suggestions, all problems at once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from difflora.config import Problems, load_config, parse_toml_text, to_toml
from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.merge import MergeConfig
from difflora.config.serve import ServeConfig
from difflora.config.spec import AdapterWeight
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError


@dataclass
class JobConfig:
    data_dir: str = "."
    rank: int = 8
    learning_rate: float = 1e-4
    targets: tuple[str, ...] = ("to_q", "to_k")
    trigger: str | None = None

    def __post_init__(self) -> None:
        problems = Problems()
        problems.check(self.rank > 0, "rank", f"must be positive, got {self.rank}")
        problems.check(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        problems.raise_if_any("job")


def test_flags_override_file_override_defaults(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('rank = 4\nlearning_rate = 0.001\ntargets = ["to_v"]\n')
    config = load_config(JobConfig, toml_path=path, overrides={"rank": 16, "learning_rate": None})
    assert config.rank == 16  # flag wins
    assert config.learning_rate == 0.001  # file wins over default; a None flag means "not given"
    assert config.targets == ("to_v",)  # TOML list becomes the field's tuple
    assert config.data_dir == "."


def test_unknown_key_suggests_nearest(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("learnig_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learnig_rate'.*Did you mean 'learning_rate'"):
        load_config(JobConfig, toml_path=path)


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load_config(JobConfig, overrides={"rank": 0, "learning_rate": -1.0})
    assert "--rank: must be positive" in str(caught.value)
    assert "--learning-rate: must be positive" in str(caught.value)


def test_toml_round_trip_reproduces_the_config(tmp_path):
    config = JobConfig(rank=3, trigger='say "hi"', targets=("a", "b"))
    path = tmp_path / "again.toml"
    path.write_text(to_toml(config))
    assert load_config(JobConfig, toml_path=path) == config
    assert parse_toml_text(to_toml(config, section="train"))["train"]["rank"] == 3


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(JobConfig, toml_path=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(JobConfig, toml_path=bad)


def test_first_n_lists_some_and_counts_the_rest():
    from difflora.errors import first_n

    names = [f"key{i}" for i in range(25)]
    assert first_n(names[:3], 20) == "key0, key1, key2"
    listing = first_n(names, 20, separator="\n  ")
    assert listing.splitlines()[:2] == ["key0", "  key1"]
    assert listing.splitlines()[-1] == "  ... and 5 more" and "key20" not in listing
    assert first_n(names, 0) == "... and 25 more"


def test_sample_scheduler_is_checked_before_training():
    with pytest.raises(ConfigError) as caught:
        TrainConfig(data_dir="x", sample_scheduler="eulr")
    assert "--sample-scheduler" in str(caught.value) and "euler-a" in str(caught.value)


JOB_CONFIGS = {
    "train": lambda: TrainConfig(data_dir="images", sample_prompts=["a cat"], sample_seeds=["3"]),
    "generate": lambda: GenerateConfig(prompt="a cat", adapters=["style:0.7"], sweep=["style:0,1"]),
    "merge": lambda: MergeConfig(adapters=["a:0.5", "b"], output="m.safetensors", adapter_dir=["x"]),
    "export": lambda: ExportConfig(adapter="a.safetensors"),
    "serve": lambda: ServeConfig(adapter_dir=["x"]),
}


@pytest.mark.parametrize("job", sorted(JOB_CONFIGS))
def test_job_configs_are_frozen_with_their_lists_stored_as_tuples(job):
    config = JOB_CONFIGS[job]()
    field = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, getattr(config, field))
    for field in dataclasses.fields(config):
        assert not isinstance(getattr(config, field.name), list), field.name
    assert hash(config) == hash(JOB_CONFIGS[job]())  # frozen all the way down


def test_adapter_sets_and_sweeps_are_parsed_once_into_values():
    config = GenerateConfig(prompt="a cat", adapters=["style:0.7,subject:0.3:0.5"], sweep=["style:0,0.5"])
    assert config.adapter_weights == (AdapterWeight("style", 0.7), AdapterWeight("subject", 0.3, 0.5))
    assert config.adapter_weights is config.adapter_weights  # the value kept, not the text re-parsed
    assert config.sweeps == (("style", (0.0, 0.5)),)
    merge = MergeConfig(adapters=["a:0.5", "b"], output="m.safetensors")
    assert merge.adapter_weights == (AdapterWeight("a", 0.5), AdapterWeight("b", 1.0))
    assert TrainConfig(data_dir="images", sample_seeds=["3"]).sample_seeds == (3,)
