"""The optimizers LoRA users pick now: Prodigy (at lr 1, its step-size estimate reported), schedule-free AdamW
(every saved adapter holds its evaluation weights, recomputed here from the checkpoint's training weights and
the optimizer's z), Adafactor; each resumed bit for bit, a missing package named in one line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difflora.training.loop as loop
import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.formats.read import load_adapter
from difflora.training.checkpoint import latest_checkpoint, load_checkpoint
from tests.support.training import make_workspace, tiny_train_config

OPTIMIZERS = ("prodigy", "adamw-schedulefree", "adafactor")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("optimizers"))


def _config(workspace: Path, out: Path, optimizer: str, **changes) -> TrainConfig:
    run = dict(
        cache_dir=str(workspace / "cache"), max_steps=4, save_every=2, batch_size=2, optimizer=optimizer
    )
    if optimizer != "prodigy":
        run["learning_rate"] = 1e-2
    else:
        run["learning_rate"] = None  # Prodigy's default: 1
    return tiny_train_config(workspace, out, data="stripes", **(run | changes))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_resumes_bit_for_bit(workspace, tmp_path, monkeypatch, optimizer):
    straight = trainer.train(_config(workspace, tmp_path / "a", optimizer), progress=False)
    calls, real = {"n": 0}, loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3: the checkpoint at step 2 is written
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(workspace, tmp_path / "b", optimizer), progress=False)
    monkeypatch.setattr(loop, "step_loss", real)
    resumed = trainer.train(_config(workspace, tmp_path / "b", optimizer, resume=True), progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(v) for k, v in a.items() if k.endswith("lora_B.weight"))  # it trained
    assert load_adapter(straight).meta.extra["difflora.train.optimizer"] == optimizer


def test_prodigy_runs_at_lr_1_and_reports_its_step_size(workspace, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="difflora"):
        path = trainer.train(_config(workspace, tmp_path, "prodigy"), progress=False)
    assert load_adapter(path).meta.extra["difflora.train.learning_rate"] == "1.0"
    assert any("Prodigy's step-size estimate at the end: d = " in r.getMessage() for r in caplog.records)


def test_schedule_free_saves_its_evaluation_weights(workspace, tmp_path):
    """x = y + (1 - 1/β1)·(z - y): schedulefree's own eval(), recomputed from the checkpoint's training
    weights y and the optimizer's z; the adapter holds x, never y."""
    trainer.train(_config(workspace, tmp_path, "adamw-schedulefree"), progress=False)
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "stripes.run" / "checkpoints"))
    group = checkpoint.optimizer["param_groups"][0]
    # the optimizer numbers parameters in the model's order (the checkpoint file sorts them by name)
    probe = trainer.setup(_config(workspace, tmp_path / "order", "adamw-schedulefree"), progress=False)
    names = list(probe.models.trainable)
    probe.log.close()
    beta1 = group["betas"][0]
    assert group["train_mode"] is True  # the checkpoint keeps the training mode and weights
    adapter = load_file(str(tmp_path / "stripes.safetensors"))
    moved = 0
    for index, name in enumerate(names):
        y, z = checkpoint.parameters[name], checkpoint.optimizer["state"][index]["z"]
        x = y + (1 - 1 / beta1) * (z - y)
        saved = adapter[name.replace(".default", "")]  # the native file: peft's names without the adapter's
        torch.testing.assert_close(saved, x, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(x, y)
    assert moved  # the evaluation weights differ from the training weights


def test_a_missing_package_is_one_line(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what an uninstalled package looks like to import
    with pytest.raises(ConfigError, match=r"--optimizer prodigy needs the prodigyopt package: pip install"):
        trainer.train(_config(workspace, tmp_path, "prodigy"), progress=False)


def test_help_lists_the_optimizers():
    from click.testing import CliRunner

    from difflora.cli import cli

    text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert all(name in text for name in OPTIMIZERS)
