"""The validation loss (--validation-split, --validation-dir, --validate-every, --keep-best): held-out images
chosen reproducibly and never trained on, a loss that depends only on the weights (fixed levels, fixed
noise, dropout off), the curve bit-identical across --resume, the best checkpoint named and kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difflora.training.loop as loop
import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.data.examples import Example
from difflora.data.validation import hold_out
from difflora.errors import ConfigError
from difflora.formats.read import load_adapter
from difflora.training.check import check_folder
from difflora.training.run import Objective
from difflora.training.validation import GRID_POINTS, grid, measure
from tests.support.training import make_workspace, tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("validation"))


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    """6 steps at batch 2, a checkpoint every 2 steps, 2 of the 8 images held out."""
    run = dict(
        cache_dir=str(workspace / "cache"), batch_size=2, max_steps=6, save_every=2, keep_checkpoints=5
    )
    return tiny_train_config(workspace, out, data="stripes", **(run | {"validation_split": 0.25} | changes))


def _column(run_dir: Path, name: str) -> list[str]:
    with open(run_dir / "loss.csv", newline="") as handle:
        return [row[name] for row in csv.DictReader(handle)]


def _example(name: str) -> Example:
    return Example(Path("/data") / name, "a caption", 1, None, name, (16, 16), ".")


def test_the_held_out_images_depend_on_the_seed_not_the_scan_order():
    examples = [_example(f"{i:02d}.png") for i in range(20)]
    training, held = hold_out(examples, 0.1, seed=0)
    assert len(held) == 2 and not {e.path for e in held} & {e.path for e in training}
    assert [e.path for e in training] == [e.path for e in examples if e not in held]  # scanned order kept
    again = hold_out(list(reversed(examples)), 0.1, seed=0)[1]
    assert [e.path for e in again] == [e.path for e in held]
    others = {tuple(e.path for e in hold_out(examples, 0.1, seed=s)[1]) for s in range(8)}
    assert len(others) > 1  # the seed chooses
    assert len(hold_out(examples[:3], 0.01, seed=0)[1]) == 1  # a split above 0 holds out at least one


def test_a_split_that_leaves_nothing_to_train_on_is_one_line():
    with pytest.raises(
        ConfigError, match=r"holds out 2 of the folder's 2 images and leaves none to train on"
    ):
        hold_out([_example("a.png"), _example("b.png")], 0.9, seed=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"validation_split": 0.1, "validation_dir": "elsewhere"}, "both given: choose one"),
        ({"keep_best": True}, "--keep-best: needs held-out images"),
        ({"validate_every": 5}, "--validate-every: needs held-out images"),
        ({"validation_split": 1.0}, r"--validation-split: must be in \[0, 1\)"),
        ({"validation_dir": "data/held"}, "inside the training folder"),
    ],
)
def test_validation_settings_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data_dir="data", **changes)


def test_the_grid_is_the_centres_of_equal_slices():
    ddpm = Objective(torch.zeros(1000), "epsilon", 1.0, 0.0, 0.0)
    assert grid(ddpm).tolist() == [62, 187, 312, 437, 562, 687, 812, 937] and GRID_POINTS == 8
    flow = Objective(torch.zeros(1000), "epsilon", 1.0, 0.0, 0.0, flow=object())
    assert grid(flow).tolist() == pytest.approx([(k + 0.5) / 8 for k in range(8)])


def test_check_lists_the_held_out_images(workspace):
    report = check_folder(TrainConfig(data_dir=str(workspace / "stripes"), validation_split=0.25))
    text = report.render()
    assert "validation: 2 held-out images (--validation-split 0.25): " in text
    assert "6 images" in text or report.plan.images == 6


def test_a_run_validates_at_checkpoints_and_keeps_the_best(workspace, tmp_path):
    path = trainer.train(_config(workspace, tmp_path, keep_best=True, validate_every=1), progress=False)
    run = tmp_path / "stripes.run"
    values = [float(v) for v in _column(run, "validation_loss")]  # every step: --validate-every 1
    assert len(values) == 6 and all(v > 0 for v in values)
    plan = (run / "plan.txt").read_text()
    held = (
        plan.split("validation  2 held-out images (--validation-split 0.25): ")[1].split(";")[0].split(", ")
    )
    meta = load_adapter(path).meta.extra
    assert meta["difflora.train.num_train_images"] == "6" and len(held) == 2  # held out: never trained on
    checkpoints = {2: values[1], 4: values[3], 6: values[5]}  # the best is chosen among checkpoints
    best_step = min(checkpoints, key=checkpoints.get)
    best = load_file(str(tmp_path / "stripes.best.safetensors"))
    kept = load_file(str(run / f"checkpoints/step-{best_step:06d}/adapter.safetensors"))
    assert best.keys() == kept.keys() and all(torch.equal(best[k], kept[k]) for k in best)
    state = json.loads((run / "checkpoints/step-000006/state.json").read_text())
    assert state["info"]["validation_best"] == [best_step, checkpoints[best_step]]  # what a resume restores


def test_the_loss_depends_only_on_the_weights(workspace, tmp_path):
    """Measured twice, in chunks of 1 row or 16, with LoRA dropout set: the same value (dropout is off,
    the noise is the image's own)."""
    run = trainer.setup(_config(workspace, tmp_path, lora_dropout=0.5), progress=False)
    try:
        first = measure(run)
        assert measure(run) == first
        run.validation.chunk = 1
        assert measure(run) == pytest.approx(first, rel=1e-6)
        run.validation.chunk = 16
        assert measure(run) == pytest.approx(first, rel=1e-6)
        assert all(module.training for module in run.trained_modules)  # training mode restored
    finally:
        run.log.close()


def test_the_validation_curve_is_bit_identical_across_resume(workspace, tmp_path, monkeypatch):
    straight = tmp_path / "a"
    trainer.train(_config(workspace, straight, keep_best=True), progress=False)
    calls, real = {"n": 0}, loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5: checkpoints at 2 and 4 are written
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(workspace, tmp_path / "b", keep_best=True), progress=False)
    monkeypatch.setattr(loop, "step_loss", real)
    trainer.train(_config(workspace, tmp_path / "b", keep_best=True, resume=True), progress=False)
    a, b = straight / "stripes.run", tmp_path / "b" / "stripes.run"
    assert _column(a, "validation_loss") == _column(b, "validation_loss")
    assert [v for v in _column(a, "validation_loss") if v] and len(_column(b, "validation_loss")) == 6
    best_a = load_file(str(straight / "stripes.best.safetensors"))
    best_b = load_file(str(tmp_path / "b" / "stripes.best.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_a_validation_folder_is_scanned_like_the_training_folder(workspace, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    for name in ("0", "1"):
        for suffix in (".png", ".txt"):
            (held / f"{name}{suffix}").write_bytes((workspace / "stripes" / f"{name}{suffix}").read_bytes())
    config = _config(workspace, tmp_path / "out", validation_split=0.0, validation_dir=str(held), max_steps=2)
    path = trainer.train(config, progress=False)
    assert load_adapter(path).meta.extra["difflora.train.num_train_images"] == "8"
    assert [v for v in _column(tmp_path / "out" / "stripes.run", "validation_loss") if v]
    assert f"(--validation-dir {held})" in (tmp_path / "out" / "stripes.run" / "plan.txt").read_text()


def test_the_cli_and_a_toml_config_set_it(workspace, tmp_path):
    """--keep-best on the command line over a TOML file's validation settings, as a user writes them."""
    from click.testing import CliRunner

    from difflora.cli import cli
    from tests.support.training import train_args

    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nvalidation_split = 0.25\nvalidate_every = 3\n")
    args = train_args(workspace, tmp_path / "out", workspace / "cache", "--config", str(toml), "--keep-best")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    values = _column(tmp_path / "out" / "stripes.run", "validation_loss")
    assert [bool(v) for v in values] == [False, True, True, True, False, True]  # steps 2, 4, 6 and 3
    assert (tmp_path / "out" / "stripes.best.safetensors").is_file()
