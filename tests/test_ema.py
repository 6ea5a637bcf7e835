"""--ema: the moving average of the LoRA weights follows diffusers' EMAModel, is swapped in and out bit for bit,
is what `<name>.ema.safetensors` holds (recomputed by hand from every step's checkpoint), has its own
validation loss, and a resumed run ends with the same average as an uninterrupted one."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

import difflora.training.loop as loop
import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.formats.read import load_adapter
from difflora.training.ema import WeightAverage
from tests.support.training import make_workspace, tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("ema"))


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    run = dict(
        cache_dir=str(workspace / "cache"), batch_size=2, max_steps=6, save_every=1, keep_checkpoints=6
    )
    return tiny_train_config(workspace, out, data="stripes", **(run | {"ema": 0.8} | changes))


def test_the_average_follows_diffusers_ema_model():
    torch.manual_seed(0)
    weights = {"a": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.zeros(3, 2))}
    ours = WeightAverage(weights, 0.95, torch.device("cpu"))
    reference = EMAModel(list(weights.values()), decay=0.95)
    for _ in range(40):
        with torch.no_grad():
            for p in weights.values():
                p.add_(torch.randn_like(p))
        ours.update(weights)
        reference.step(list(weights.values()))
    assert ours.decay_at(40) == reference.cur_decay_value
    for mine, theirs in zip(ours.average.values(), reference.shadow_params, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_the_average_is_swapped_in_and_out_bit_for_bit():
    weights = {"a": torch.nn.Parameter(torch.randn(5, 5))}
    before = weights["a"].detach().clone()
    average = WeightAverage(weights, 0.9, torch.device("cpu"))
    average.average["a"] += 1.0
    with average.applied(weights):
        assert torch.equal(weights["a"].detach(), before + 1.0)
    assert torch.equal(weights["a"].detach(), before)


def test_ema_settings_are_checked():
    with pytest.raises(ConfigError, match=r"--ema: must be in \[0, 1\)"):
        TrainConfig(data_dir="d", ema=1.0)
    with pytest.raises(ConfigError, match="--ema-on-cpu: given without --ema"):
        TrainConfig(data_dir="d", ema_on_cpu=True)


def _by_hand(run_dir: Path, steps: int, decay: float) -> dict[str, torch.Tensor]:
    """The average recomputed from each step's checkpoint: the first update copies, then EMAModel's
    min(decay, (1+n)/(10+n))."""
    average: dict[str, torch.Tensor] = {}
    for step in range(1, steps + 1):
        weights = load_file(str(run_dir / f"checkpoints/step-{step:06d}/adapter.safetensors"))
        n = step - 1
        d = 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))
        average = {k: v.clone() if not average else d * average[k] + (1 - d) * v for k, v in weights.items()}
    return average


def test_the_ema_file_holds_the_average_of_the_steps(workspace, tmp_path):
    samples = dict(sample_every=6, sample_steps=2, sample_seeds=(1,))
    config = _config(workspace, tmp_path, validation_split=0.25, ema_on_cpu=True, **samples)
    trainer.train(config, progress=False)
    run = tmp_path / "stripes.run"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000006-ema.png", "step-000006.png"]
    ema = load_file(str(tmp_path / "stripes.ema.safetensors"))
    expected = _by_hand(run, 6, 0.8)
    assert ema.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-7)
    final = load_file(str(tmp_path / "stripes.safetensors"))
    assert any(not torch.equal(final[k], ema[k]) for k in final)  # the average is not the last step
    meta = load_adapter(tmp_path / "stripes.ema.safetensors").meta
    assert meta.name == "stripes.ema" and "moving average (--ema 0.8, 6 updates)" in meta.extra.values()
    with open(run / "loss.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["validation_loss"] and row["ema_validation_loss"] for row in rows)  # save_every 1
    assert rows[0]["validation_loss"] == rows[0]["ema_validation_loss"]  # after the first update, equal


def test_a_resumed_run_ends_with_the_same_average(workspace, tmp_path, monkeypatch):
    trainer.train(_config(workspace, tmp_path / "a", save_every=2), progress=False)
    calls, real = {"n": 0}, loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: the checkpoint at step 2 holds the average after 2 updates
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(workspace, tmp_path / "b", save_every=2), progress=False)
    monkeypatch.setattr(loop, "step_loss", real)
    trainer.train(_config(workspace, tmp_path / "b", save_every=2, resume=True), progress=False)
    a = load_file(str(tmp_path / "a" / "stripes.ema.safetensors"))
    b = load_file(str(tmp_path / "b" / "stripes.ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
