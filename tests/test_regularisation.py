"""--reg-dir: class images interleaved with the training set, balanced by repeats, cached like it, a class
image's loss weighted by --prior-weight in its batch, bad folders refused in one line, `check` and the plan
saying what is drawn, and a run resumed bit for bit; from the CLI and a TOML config."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difflora.training.loop as loop
import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.data.batches import Draw, collate
from difflora.data.regularisation import balanced_repeats
from difflora.errors import ConfigError, DatasetError
from difflora.training.check import check_folder
from difflora.training.plan import DataSettings, Tokens, plan_dataset
from tests.support.training import make_workspace, tiny_train_config, train_args

TRAINING = 8  # make_workspace's images, one repeat each
CLASS = 3  # class images in the workspace's class folder


def _write_images(folder: Path, seed: int, count: int) -> Path:
    from difflora.embedded.shapes import base_batch

    folder.mkdir(parents=True, exist_ok=True)
    images, captions = base_batch(seed, count)
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"c{index}.png")
        (folder / f"c{index}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("regularisation"))
    _write_images(root / "class", 7, CLASS)
    return root


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    run = dict(
        cache_dir=str(workspace / "cache"), batch_size=2, max_steps=6, save_every=2, keep_checkpoints=5
    )
    reg = {"reg_dir": str(workspace / "class")}
    return tiny_train_config(workspace, out, data="stripes", **(run | reg | changes))


@pytest.mark.parametrize(
    ("draws", "count", "expected"),
    [(24, 12, [2] * 12), (8, 3, [3, 3, 2]), (3, 5, [1, 1, 1, 0, 0]), (12, 12, [1] * 12)],
)
def test_class_images_are_repeated_to_match_the_training_draws(draws, count, expected):
    repeats = balanced_repeats(draws, count)
    assert repeats == expected and sum(repeats) == draws


def test_an_epoch_draws_each_image_as_often_as_its_repeats_say(workspace):
    settings = DataSettings.from_config(_config(workspace, workspace / "o"), resolution=16, bucket_step=8)
    planned = plan_dataset(settings, Tokens(None, None), strict=True)
    reg = planned.regularisation
    assert reg is not None and [e.repeats for e in reg.examples] == [3, 3, 2]
    assert reg.describe() == "3 class images, repeated 2-3x to match 8 training images, prior weight 1.0"
    drawn = [draw.index for batch in planned.sampler.batches(0) for draw in batch]
    counts = [drawn.count(index) for index in range(TRAINING + CLASS)]
    assert counts == [1] * TRAINING + [3, 3, 2]
    assert planned.plan is not None and planned.plan.examples_per_epoch == 2 * TRAINING
    assert planned.plan.images == TRAINING and planned.plan.batches_per_epoch == 2 * TRAINING // 2


def test_bad_settings_are_one_line_each(workspace, tmp_path):
    data = str(workspace / "stripes")
    inside = _write_images(workspace / "stripes" / "classes", 1, 1)
    try:
        with pytest.raises(ConfigError, match="overlap, so class images would train as the subject"):
            TrainConfig(data_dir=data, reg_dir=str(inside))
    finally:
        for path in inside.iterdir():
            path.unlink()
        inside.rmdir()
    with pytest.raises(ConfigError, match="--reg-dir and --preserve-base both given: choose one"):
        TrainConfig(data_dir=data, reg_dir=str(workspace / "class"), preserve_base=True, trigger="zebra")
    with pytest.raises(ConfigError, match="no such folder"):
        TrainConfig(data_dir=data, reg_dir=str(tmp_path / "none"))
    empty = tmp_path / "empty"
    empty.mkdir()
    message = f"--reg-dir {empty}: no usable class image in it; add class images with captions, or leave"
    with pytest.raises(DatasetError, match="^" + message):
        trainer.train(_config(workspace, tmp_path / "out", reg_dir=str(empty)), progress=False)
    report = check_folder(TrainConfig(data_dir=data, reg_dir=str(empty)))
    assert not report.ok and report.errors[-1].startswith(message)


def test_check_and_the_plan_show_the_class_images(workspace, tmp_path):
    report = check_folder(TrainConfig(data_dir=str(workspace / "stripes"), reg_dir=str(workspace / "class")))
    text = report.render()
    assert f"Regularisation images: {workspace / 'class'}\n  3 class images, repeated 2-3x" in text
    assert report.ok and "8 images, 16 examples per epoch" in text
    trainer.train(_config(workspace, tmp_path / "out", max_steps=1, prior_weight=0.5), progress=False)
    plan = (tmp_path / "out" / "stripes.run" / "plan.txt").read_text()
    expected = (
        "  prior       regularisation: 3 class images, repeated 2-3x to match 8 training images, prior weight "
        f"0.5 (--reg-dir {workspace / 'class'}); drift measured on 3 class captions at each checkpoint"
    )
    assert expected in plan


def test_class_latents_are_cached_and_their_loss_weighs_the_prior_weight(workspace, tmp_path):
    """A batch of a training and a class image: the loss is the training image's + W x the class image's,
    over the batch, with the same noise; each class image's latents come from the cache."""
    run = trainer.setup(_config(workspace, tmp_path, prior_weight=2.5), progress=False)
    try:
        dataset = run.data.dataset
        assert dataset.latents is not None and len(dataset.latents[1]) == TRAINING + CLASS
        batch = collate([dataset[Draw(0, False, 0)], dataset[Draw(TRAINING + 1, False, 0)]])
        assert batch["loss_weight"].tolist() == [1.0, 2.5] and "latent_mean" in batch

        def loss(weights: list[float]) -> float:
            generator = torch.Generator().manual_seed(3)
            with torch.no_grad():
                return float(loop.step_loss({**batch, "loss_weight": torch.tensor(weights)}, run, generator))

        training, cls = loss([1.0, 0.0]), loss([0.0, 1.0])
        assert training > 0 and cls > 0
        assert loss([1.0, 2.5]) == pytest.approx(training + 2.5 * cls, rel=1e-6)
    finally:
        run.log.close()


def _drift(run_dir: Path) -> list[str]:
    with open(run_dir / "loss.csv", newline="") as handle:
        return [row["drift"] for row in csv.DictReader(handle)]


def test_a_run_resumes_bit_for_bit(workspace, tmp_path, monkeypatch):
    straight = trainer.train(_config(workspace, tmp_path / "a"), progress=False)
    calls, real = {"n": 0}, loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5: checkpoints at 2 and 4 are written
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(workspace, tmp_path / "b"), progress=False)
    monkeypatch.setattr(loop, "step_loss", real)
    resumed = trainer.train(_config(workspace, tmp_path / "b", resume=True), progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert _drift(tmp_path / "a" / "stripes.run") == _drift(tmp_path / "b" / "stripes.run")
    assert [bool(v) for v in _drift(tmp_path / "a" / "stripes.run")] == [False, True] * 3


def test_the_cli_and_a_toml_config_set_it(workspace, tmp_path):
    from click.testing import CliRunner

    from difflora.cli import cli

    toml = tmp_path / "run.toml"
    toml.write_text(f"[train]\nreg_dir = {str(workspace / 'class')!r}\nprior_weight = 0.5\n")
    for name, extra in (("toml", ["--config", str(toml)]), ("cli", ["--reg-dir", str(workspace / "class")])):
        result = CliRunner().invoke(cli, train_args(workspace, tmp_path / name, workspace / "cache", *extra))
        assert result.exit_code == 0, result.output
        plan = (tmp_path / name / "stripes.run" / "plan.txt").read_text()
        weight = "0.5" if name == "toml" else "1.0"
        assert f"repeated 2-3x to match 8 training images, prior weight {weight}" in plan
    result = CliRunner().invoke(
        cli, ["check", str(workspace / "stripes"), "--reg-dir", str(workspace / "class")]
    )
    assert result.exit_code == 0 and "Regularisation images" in result.output, result.output
