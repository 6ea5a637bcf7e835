"""Advice: one line per setting outside its usual range, in the plan; what to do beside the gradient
monitor's warnings; `--quiet-advice` silences all of it and nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import difflora.training.trainer as trainer
from difflora.training.advice import gradient_advice, plan_advice
from difflora.training.gradients import GradientMonitor
from tests.support.training import make_workspace, tiny_train_config

USUAL = dict(
    rank=16, alpha=8.0, rslora=False, learning_rate=1e-4, default_lr=1e-4, optimizer="AdamW", model="SD 1.x"
)


def test_usual_settings_get_no_advice():
    assert plan_advice(**USUAL) == []
    assert plan_advice(**(USUAL | dict(alpha=64.0, learning_rate=9e-4))) == []  # alpha/rank 4, lr 9x: usual


def test_each_unusual_setting_gets_one_line_saying_what_to_do():
    rank, scale, lr = plan_advice(**(USUAL | dict(rank=128, alpha=1.0, learning_rate=5e-3)))
    assert rank.startswith("rank 128 is high") and "difflora inspect --spectrum" in rank
    assert (
        scale.startswith(f"alpha/rank = {1 / 128:g} is outside the usual 0.25-4")
        and "--alpha 64 to 128" in scale
    )
    assert lr.startswith("learning rate 0.005 is 50x the usual 0.0001 for AdamW on a SD 1.x model")
    assert "may diverge" in lr and "--learning-rate 0.0001" in lr
    (slow,) = plan_advice(**(USUAL | dict(learning_rate=1e-6)))
    assert "0.01x" in slow and "may learn nothing" in slow
    (rs,) = plan_advice(**(USUAL | dict(rslora=True, alpha=40.0)))  # 40 / sqrt(16) = 10
    assert rs.startswith("alpha/rank = 10 is outside") and "--alpha 2 to 4" in rs
    assert all("\n" not in line for line in (rank, scale, lr, slow, rs))


def test_gradient_findings_name_layers_and_the_advice_says_what_to_do(tmp_path):
    monitor = GradientMonitor({}, tmp_path, every=1, start_step=0)
    for step in range(1, 21):
        monitor.rows += [(step, f"unet.layer{i}", 1.0, 2.0) for i in range(8)]
        monitor.rows += [(step, "unet.dead", 0.0, 1e-9), (step, "unet.wild", 400.0, 900.0)]
    (vanishing, quiet), (exploding, loud) = monitor.findings(total_steps=20)
    assert (vanishing, exploding) == ("vanishing", "exploding")
    assert "unet.dead" in quiet and "unet.wild" in loud
    assert "raise --alpha" in gradient_advice("vanishing", 1e-4) and "drop them" in gradient_advice(
        "vanishing", 1e-4
    )
    assert "--learning-rate 1e-05" in gradient_advice("exploding", 1e-4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("advice"))


@pytest.mark.parametrize("quiet", [False, True])
def test_plan_and_gradient_advice_and_quiet_advice(workspace, tmp_path, caplog, monkeypatch, quiet):
    monkeypatch.setattr(
        GradientMonitor,
        "findings",
        lambda self, total: [("exploding", "1 layer(s) with exploding gradients: unet.x")],
    )
    config = tiny_train_config(
        workspace, tmp_path, data="stripes", rank=64, alpha=1.0, grad_log_every=1, quiet_advice=quiet
    )
    with caplog.at_level(logging.INFO, logger="difflora"):
        trainer.train(config, progress=False)
    plan = (tmp_path / "stripes.run" / "plan.txt").read_text()
    advice = [line for line in plan.splitlines() if line.startswith("  advice      ")]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("advice: ")]
    warned = [r.getMessage() for r in caplog.records if "exploding gradients: unet.x" in r.getMessage()]
    assert len(warned) == 1  # the warning itself is never silenced
    if quiet:
        assert advice == [] and logged == []
    else:
        assert [a.split()[1] for a in advice] == [
            "rank",
            "alpha/rank",
            "learning",
        ]  # rank, scale, 1e-2 vs 4e-3? no
        assert logged == ["advice: " + gradient_advice("exploding", 1e-2)]
