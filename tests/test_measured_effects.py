"""Issue 21's measured effects, on the embedded model with the base as the control and the same seeds:

- --preserve-base: the captions without the trigger drift less from the base's predictions than in a run
  trained the same way without it (--prior-weight 0: the same drift measured, no preservation loss), while
  the adapter still fits the subject's images better than the base does (their denoising loss at fixed
  noise, computed here independently of the trainer);
- --masks on a set whose backgrounds are coloured noise and whose masks cover the subject: the adapter
  learns the subject (its signature above the base's) without the noisy backgrounds: the subject's own
  generations keep the base's smooth backgrounds (high-frequency energy of their border rings) where an
  unmasked run on the same set paints the noise in;
- a small set trained long: the held-out loss has a minimum before the end, the run names it, and
  --keep-best writes that checkpoint's adapter.

The trainings are run once each, when a test first needs them, with a cache of their own (the encoded
images and captions are then the same whatever ran before in the process); drift is the trainer's own
measure from loss.csv, on the same 4 prompts at the same fixed noise in every run. The masked-out gradient
being exactly 0 is tests/test_masks.py's (a unit test of the loss, and a run whose all-black masks leave
every B at zero).

Every margin below holds for the training seeds 0-3 (measured 2026-12-06 on this 2-core CPU, one thread,
120 steps at batch 4 and lr 4e-3; base values: cross 0.29, subject fit 0.266, ring energy 0.37). A run on
this tiny model is chaotic: a rounding difference anywhere moves its signatures as much as another seed
does, so no margin rests on one trajectory. (The seed-0 preserve run's cross is 0.48 with a fresh cache,
0.21 when the README's default training filled the shared cache before it, and was -0.001 in one CI run of
the suite: the two caches' latents differ by up to 2.4e-6, encoded in other batches and threads.)
- plain run (--prior-weight 0): cross 0.77 / 0.45 / 0.63 / 0.56, fit 0.034-0.038, drift at the checkpoints
  0.018-0.033;
- --preserve-base (weight 1): cross 0.48 / 0.18 / 0.18 / 0.29, fit 0.219 / 0.204 / 0.199 / 0.152, drift
  0.0054-0.0145 (0.25-0.55 x the plain run's at the same checkpoint);
- --masks: cross 0.50 / 0.60 / 0.48 / 0.43, ring energy 2.4 / 2.6 / 1.5 / 3.1; unmasked: ring energy
  8.1 / 12.0 / 8.3 / 13.6, cross 0.54 / 0.64 / 0.46 / 0.38. The base's other prompts' background colours
  (issue 21's wording, and this test's measure before) do not separate the two: their change is 25 vs 69
  of 255 at seed 0, but 29.0 vs 29.1 and 52 vs 33 at seeds 1-2: the LoRA on the convolutions moves every
  prompt's colours, masked or not.
- small set trained long (seeds 1-4): last checkpoint 1.12 / 1.16 / 1.12 / 1.15 x the lowest.

Not reached: issue 21 asks for the cross signature past CROSS_THRESHOLD (0.7) in the preserve and masked
runs; only the plain run's seed 0 passes it. Why preservation holds the subject back here: on the embedded
model the cross is learnt by the LoRA on ResNet convolutions (attention-only LoRA never learns it, see
difflora/training/plan.py's defaults), which the text cannot switch off, so every change they make also
moves the trigger-free predictions that preservation pins to the base's. Settings tried at seed 0: prior
weight 0.5 0.54 (seeds 1-3: 0.36 / 0.39 / 0.26), 0.2 0.08; weight 1 at batch 2 for 240 steps 0.20; weight
0.5 for 240 steps 0.67 / 0.22 (seeds 1-2); weight 1 with the text encoder's LoRA trained too 0.32. Masks
dilated by 2 px 0.56, by 4 px 0.65; 240 steps 0.41; lr 8e-3 diverges (0.21); 48 images 0.39. Masks with
--preserve-base (trigger crossglyph; seeds 0-2): cross 0.52 / 0.56 / 0.61, ring energy 1.4 / 0.8 / 1.6, the
other prompts' background change 16 / 13 / 47 of 255 (masks alone 25 / 29 / 52): better, still not reliable.
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
from tests.support.fit import fixed_noise_loss
from tests.support.paths import SAMPLE_DATA, copy_samples

pytestmark = pytest.mark.slow

SEEDS = [0, 1, 2, 3]
RENDER_STEPS = 12
CROSS_PROMPT = "a red crossglyph on a white background"
SUBJECT_COLOURS = ("red", "green", "blue", "yellow")  # of the noise set's captions, "a <colour> crossglyph"
FIT_TIMESTEPS = (100, 300, 500, 700, 900)
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

    def __init__(self, root: Path) -> None:
        self.root, self.cache, self.done = root, root / "cache", {}
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
def trainings(tmp_path_factory) -> Trainings:
    return Trainings(tmp_path_factory.mktemp("effects"))


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


def _ring_texture(pipe) -> float:
    """Mean high-frequency energy (each pixel's distance to its 3x3 neighbourhood's mean, of 255) of the
    border rings of "a <colour> crossglyph" generations, over the colours and seeds: smooth backgrounds
    score under 1, painted-in noise several times that."""
    ring = np.ones((64, 64), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    energies = []
    for colour in SUBJECT_COLOURS:
        for image in _images(pipe, f"a {colour} crossglyph"):
            padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
            blurred = sum(padded[y : y + 64, x : x + 64] for y in range(3) for x in range(3)) / 9
            energies.append(np.abs(image - blurred)[ring].mean())
    return float(np.mean(energies))


def _subject_fit(pipe) -> float:
    """The UNet's denoising loss (epsilon) on the subject's 24 images with their own captions, at fixed
    noise and FIT_TIMESTEPS: how well the weights as they are fit the concept."""
    return fixed_noise_loss(pipe, SAMPLE_DATA / "subject", timesteps=FIT_TIMESTEPS)


def _with_adapter(pipe, adapter: Path, measure):
    pipe.load_lora_weights(str(adapter))  # diffusers' own loader
    try:
        return measure(pipe)
    finally:
        pipe.unload_lora_weights()


def test_preserving_the_base_keeps_trigger_free_prompts_closer_while_the_subject_is_learnt(
    trainings, base_pipe
):
    """Margins: the drift of the trigger-free captions under 0.6 x the plain run's at every checkpoint
    (measured: 0.23-0.45 x over seeds 0-3); the subject's images (with their trigger captions) fitted better
    than the base fits them, their loss under 0.9 x the base's (measured 0.57-0.82 x; the plain run's
    0.13-0.14 x: preservation costs fit, see the module docstring)."""
    kept, plain = _drift(trainings("preserve")), _drift(trainings("plain"))
    assert len(kept) == len(plain) == 3, (kept, plain)
    assert all(k < 0.6 * p for k, p in zip(kept, plain, strict=True)), (kept, plain)
    fitted, base = _with_adapter(base_pipe, trainings("preserve"), _subject_fit), _subject_fit(base_pipe)
    assert fitted < 0.9 * base, (fitted, base)


def test_a_masked_subject_is_learnt_without_its_noisy_backgrounds(trainings, base_pipe):
    """Margins: the subject's own generations (each colour the set's captions name) have under half the
    background texture the unmasked run's have (high-frequency energy of their border rings; measured
    0.19-0.29 x at the same seed), and the masked adapter's cross signature is at least 0.1 above the base's (measured
    0.14-0.31 above over seeds 0-3)."""
    masked = _with_adapter(base_pipe, trainings("masked"), _ring_texture)
    unmasked = _with_adapter(base_pipe, trainings("unmasked"), _ring_texture)
    assert masked < 0.5 * unmasked, (masked, unmasked)
    assert _with_adapter(base_pipe, trainings("masked"), _cross) > _cross(base_pipe) + 0.1


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
