"""--preserve-base: the trigger word removed from the captions, the base model's own prediction (every LoRA
layer off) as the target, a prior loss and a drift of exactly 0 for the zero-initialised LoRA, and trained
adapters whose trigger-free predictions drift less from the base's than without it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.data.batches import Draw, collate
from difflora.errors import ConfigError
from difflora.training.forward import latents_of
from difflora.training.prior import adapters_off, drift, prior_loss, strip_trigger
from tests.support.training import make_workspace, tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("prior"))


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    run = dict(cache_dir=str(workspace / "cache"), trigger="zebra", max_steps=4, save_every=2, batch_size=2)
    return tiny_train_config(workspace, out, data="stripes", **(run | {"preserve_base": True} | changes))


def _drift(run_dir: Path) -> list[float]:
    with open(run_dir / "loss.csv", newline="") as handle:
        return [float(row["drift"]) for row in csv.DictReader(handle) if row["drift"]]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("zebra, a red circle, stripes", "a red circle, stripes"),
        ("a Zebra style circle", "a style circle"),
        ("zebras, zebra", "zebras"),  # a word, not a prefix
        ("zebra", ""),
    ],
)
def test_the_trigger_word_is_removed(caption, expected):
    assert strip_trigger(caption, "zebra") == expected


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--preserve-base: needs prompts without the concept"):
        TrainConfig(data_dir="d", preserve_base=True)
    with pytest.raises(ConfigError, match="--preserve-prompts: given without --preserve-base"):
        TrainConfig(data_dir="d", preserve_prompts=str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        TrainConfig(data_dir="d", preserve_base=True, preserve_prompts=str(tmp_path / "none.txt"))


def test_the_zero_initialised_lora_has_no_prior_loss_and_no_drift(workspace, tmp_path):
    run = trainer.setup(_config(workspace, tmp_path), progress=False)
    try:
        batch = collate([run.data.dataset[Draw(i, False, 0)] for i in range(2)])
        generator = torch.Generator().manual_seed(0)
        latents = run.objective.normalize(latents_of(batch, run, generator))
        noisy = torch.randn(latents.shape, generator=generator)
        timesteps = torch.tensor([100, 700])
        assert float(prior_loss(run, batch, noisy, timesteps).detach()) == 0.0
        assert drift(run) == 0.0
        with torch.no_grad():  # a non-zero B: the adapted model moves, and switching LoRA off undoes it
            for name, parameter in run.models.trainable.items():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)
        assert drift(run) > 0
        layers = [m for m in run.unet.modules() if isinstance(m, BaseTunerLayer)]
        with adapters_off(run.trained_modules):
            assert all(layer.disable_adapters for layer in layers)
        assert not any(layer.disable_adapters for layer in layers)
        assert all(p.requires_grad for p in run.models.trainable.values())  # trainable again after
    finally:
        run.log.close()


def test_preserving_the_base_keeps_trigger_free_prompts_closer_to_it(workspace, tmp_path):
    trainer.train(_config(workspace, tmp_path / "kept"), progress=False)
    trainer.train(_config(workspace, tmp_path / "free", prior_weight=0.0), progress=False)  # drift only
    kept, free = _drift(tmp_path / "kept" / "stripes.run"), _drift(tmp_path / "free" / "stripes.run")
    assert len(kept) == len(free) == 2 and kept[-1] < free[-1], (kept, free)
    plan = (tmp_path / "kept" / "stripes.run" / "plan.txt").read_text()
    assert "preserve    the base model's own predictions on the captions without 'zebra', weight 1" in plan


def test_preserve_prompts_from_a_file(workspace, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\na green triangle on a black background\n")
    trainer.train(
        _config(workspace, tmp_path / "out", preserve_prompts=str(prompts), trigger=None), progress=False
    )
    run = tmp_path / "out" / "stripes.run"
    assert f"2 prompts from {prompts}" in (run / "plan.txt").read_text() and len(_drift(run)) == 2
