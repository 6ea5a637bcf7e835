"""Issue 21's measured effects, on the embedded model with the base as the control and the same seeds:

- --preserve-base: the captions without the trigger drift less from the base's predictions than in a run
  trained the same way without it (--prior-weight 0: the same drift measured, no preservation loss), while
  the subject's signature (`cross_score` of generations) rises well above the base's;
- --masks on a set whose backgrounds are coloured noise and whose masks cover the subject: the adapter
  learns the subject (its signature well above the base's) while the base's other prompts keep their
  background colours (their generations' borders, against the base's at the same seeds) far better than an
  unmasked run on the same set does;
- a small set trained long: the held-out loss has a minimum before the end, the run names it, and
  --keep-best writes that checkpoint's adapter.

The trainings are shared through a session fixture (each trained once, when a test first needs it); drift is
the trainer's own measure from loss.csv, on the same 4 prompts at the same fixed noise in every run.
The masked-out gradient being exactly 0 is tests/test_masks.py's (a unit test of the loss, and a run whose
all-black masks leave every B at zero).

Not reached: issue 21 asks for the cross signature past CROSS_THRESHOLD (0.7) in the preserve and masked
runs; the plain run passes it (0.77), these do not. Settings tried (2026-12-06, this 2-core CPU, one thread,
120 steps at batch 4 and lr 4e-3 unless said; cross as `_cross` measures it, the base's 0.29):
- --preserve-base: prior weight 1 0.48 (drift 0.30-0.45 x the plain run's); 0.5 0.54 (0.30-0.46 x); 0.2
  0.08; weight 1 at batch 2 for 240 steps 0.20; weight 1 with the text encoder's LoRA trained too 0.32.
- --masks: as here 0.50 (background change well under half the unmasked run's 68.6); masks dilated by 2 px
  0.56 (background 0.52 x), by 4 px 0.65 (0.61 x); 240 steps 0.41; lr 8e-3 diverges (0.21); 48 images 0.39.
  Without masks on the same images: 0.54.
A single run's signature moves non-monotonically with the weight and the steps: the margins below are what
holds for every run measured, not the threshold.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from tests.support.paths import SAMPLE_DATA, copy_samples

pytestmark = pytest.mark.slow

SEEDS = [0, 1, 2, 3]
RENDER_STEPS = 12
CROSS_PROMPT = "a red crossglyph on a white background"
OTHER_PROMPTS = (
    "a blue circle on a black background",
    "a green square on a white background",
    "a yellow triangle on a gray background",
)
STEPS = 120  # optimizer steps of every run here, at batch 4 and a constant learning rate
BORDER = 6  # px: the ring of a 64 px generation measured as its background


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noise_folder(folder: Path, masks: Path, count: int = 24) -> None:
    """Crosses on backgrounds of coloured noise (a random colour per image, noise per pixel), captioned
    without a background, each with a mask of the cross."""
    from difflora.embedded import shapes

    folder.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(5)
    scenes = shapes.sample_scenes(rng, count, shapes=(shapes.SUBJECT_SHAPE,))
    coverage = shapes._coverage(scenes)[..., None]
    colours = rng.uniform(0, 255, (count, 1, 1, 3))
    noise = np.clip(colours + rng.normal(0, 60, (count, 64, 64, 3)), 0, 255)
    pixels = coverage * scenes.rgb[:, None, None, :] + (1 - coverage) * noise
    for index in range(count):
        Image.fromarray(np.rint(pixels[index]).astype(np.uint8)).save(folder / f"n{index}.png")
        (folder / f"n{index}.txt").write_text(f"a {shapes.COLOURS[scenes.colour[index]]} crossglyph")
        mask = (coverage[index, ..., 0] > 0.5).astype(np.uint8) * 255
        Image.fromarray(mask, "L").save(masks / f"n{index}.png")


class Trainings:
    """The runs of this module, each trained once when first asked for: name -> its output folder."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root, self.cache, self.done = root, cache, {}
        _noise_folder(root / "noise", root / "masks")

    def _config(self, name: str, data: Path, **changes: object) -> TrainConfig:
        run = dict(max_steps=STEPS, save_every=STEPS // 3, lr_scheduler="constant", sample_every=0)
        where = dict(data_dir=str(data), output_dir=str(self.root / name), cache_dir=str(self.cache))
        return TrainConfig(**(where | run | {"num_threads": 1} | changes))

    def configs(self) -> dict[str, Callable[[], TrainConfig]]:
        subject, noise = SAMPLE_DATA / "subject", self.root / "noise"
        trigger = dict(trigger="crossglyph", preserve_base=True)  # drift on the captions without it
        return {
            "plain": lambda: self._config("plain", subject, **trigger, prior_weight=0.0),  # drift only
            "preserve": lambda: self._config("preserve", subject, **trigger),
            "masked": lambda: self._config("masked", noise, masks=str(self.root / "masks")),
            "unmasked": lambda: self._config("unmasked", noise),
        }

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            self.done[name] = trainer.train(self.configs()[name](), progress=False)
        return self.done[name]


@pytest.fixture(scope="session")
def trainings(tmp_path_factory, sample_cache) -> Trainings:
    return Trainings(tmp_path_factory.mktemp("effects"), sample_cache)


@pytest.fixture(scope="session")
def base_pipe():
    from difflora.models.loading import load_pipeline

    return load_pipeline(None)


def _drift(adapter: Path) -> list[float]:
    with open(adapter.with_suffix(".run") / "loss.csv", newline="") as handle:
        return [float(row["drift"]) for row in csv.DictReader(handle) if row["drift"]]


def _images(pipe, prompt: str) -> list[np.ndarray]:
    from difflora.generation.pipeline import render

    images = render(pipe, [prompt] * len(SEEDS), seeds=SEEDS, steps=RENDER_STEPS, guidance=5.0)
    return [np.asarray(image, dtype=np.float64)[..., :3] for image in images]


def _cross(pipe) -> float:
    from difflora.embedded.signatures import cross_score

    return float(np.mean([cross_score(image) for image in _images(pipe, CROSS_PROMPT)]))


def _backgrounds(pipe) -> np.ndarray:
    """Mean colour of each generation's border ring, per other prompt and seed: [prompts, seeds, 3]."""
    ring = np.ones((64, 64), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    return np.array([[image[ring].mean(axis=0) for image in _images(pipe, p)] for p in OTHER_PROMPTS])


def _with_adapter(pipe, adapter: Path, measure):
    pipe.load_lora_weights(str(adapter))  # diffusers' own loader
    try:
        return measure(pipe)
    finally:
        pipe.unload_lora_weights()


def test_preserving_the_base_keeps_trigger_free_prompts_closer_while_the_subject_is_learnt(
    trainings, base_pipe
):
    """Margins: the drift of the trigger-free captions at most 0.8 x the plain run's at every checkpoint
    (measured: 0.3-0.45 x); the cross signature at least 0.1 above the base's (measured: 0.48 against 0.29;
    at --prior-weight 1 and 120 steps it stays under CROSS_THRESHOLD 0.7, which the plain run passes)."""
    kept, plain = _drift(trainings("preserve")), _drift(trainings("plain"))
    assert len(kept) == len(plain) == 3, (kept, plain)
    assert all(k < 0.8 * p for k, p in zip(kept, plain, strict=True)), (kept, plain)
    assert _with_adapter(base_pipe, trainings("preserve"), _cross) > _cross(base_pipe) + 0.1


def test_a_masked_subject_is_learnt_without_its_noisy_backgrounds(trainings, base_pipe):
    """Margins: the masked adapter changes the base's other prompts' background colours (their generations'
    border rings, mean absolute change over prompts, seeds and channels, of 255) by at most half what the
    unmasked run on the same images does, and its cross signature is at least 0.15 above the base's."""
    base = _backgrounds(base_pipe)
    masked = np.abs(_with_adapter(base_pipe, trainings("masked"), _backgrounds) - base).mean()
    unmasked = np.abs(_with_adapter(base_pipe, trainings("unmasked"), _backgrounds) - base).mean()
    assert masked < 0.5 * unmasked, (masked, unmasked)
    assert _with_adapter(base_pipe, trainings("masked"), _cross) > _cross(base_pipe) + 0.15


def test_a_small_set_trained_long_has_a_validation_minimum_the_run_names_and_keeps(tmp_path, caplog):
    """2 crosses trained on at a constant rate, 4 others held out: the held-out loss falls while the cross
    is learnt, then rises while the 2 images are memorised. Margin: the last checkpoint's loss at least
    1.1 x the lowest; --keep-best writes exactly the lowest checkpoint's adapter, tensor by tensor."""
    from safetensors.torch import load_file

    copy_samples("subject", tmp_path / "train", range(0, 2))
    copy_samples("subject", tmp_path / "held", range(10, 14))
    config = TrainConfig(
        data_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "held"),
        output_dir=str(tmp_path / "out"),
        keep_best=True,
        **dict(max_steps=60, save_every=10, keep_checkpoints=6, batch_size=2, learning_rate=2e-3),
        **dict(lr_scheduler="constant", sample_every=0, num_threads=1),
    )
    with caplog.at_level("INFO", logger="difflora"):
        adapter = trainer.train(config, progress=False)
    with open(adapter.with_suffix(".run") / "loss.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["validation_loss"]]
    curve = {int(row["step"]): float(row["validation_loss"]) for row in rows}
    best = min(curve, key=curve.__getitem__)
    assert sorted(curve) == [10, 20, 30, 40, 50, 60] and best < 60 and curve[60] > 1.1 * curve[best], curve
    assert f"validation: lowest loss {curve[best]:.6g} at step {best} " in caplog.text
    kept = load_file(str(adapter.with_name("train.best.safetensors")))
    checkpoint = load_file(
        str(adapter.with_suffix(".run") / "checkpoints" / f"step-{best:06d}" / "adapter.safetensors")
    )
    final = load_file(str(adapter))
    assert kept.keys() == checkpoint.keys() and all(torch.equal(kept[k], checkpoint[k]) for k in kept)
    assert any(not torch.equal(kept[k], final[k]) for k in kept)
