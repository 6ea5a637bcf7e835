"""Loss masks (--masks, --alpha-mask, --unmasked-weight): matched to their images, cropped and flipped with
them and averaged down to the latent grid (against numpy), cached with the latents, a loss whose masked-out
latents give exactly no gradient, and `check` and the plan saying what is masked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.data.buckets import Bucket, CropPlan
from difflora.data.cache import LatentRequest, latent_key
from difflora.data.examples import Example
from difflora.data.masks import MaskSource, mask_image, render_mask, scan_masks
from difflora.errors import ConfigError, DatasetError
from difflora.training.check import check_folder
from difflora.training.loss import diffusion_loss
from tests.support.training import make_workspace, tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("masks"))


def _masks(root: Path, name: str, fill, count: int = 8, size: int = 16) -> Path:
    """A mask folder for the workspace's 8 images: `fill(index)` gives each mask's uint8 array."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    for index in range(count):
        Image.fromarray(fill(index).astype(np.uint8), "L").save(folder / f"{index}.png")
    return folder


def _left_half(_: int, size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size))
    mask[:, : size // 2] = 255
    return mask


def test_a_mask_is_cropped_flipped_and_averaged_down_like_its_image(tmp_path):
    values = np.zeros((32, 48), dtype=np.uint8)
    values[:, :12] = 255  # a white band on the left
    Image.fromarray(values, "L").save(tmp_path / "m.png")
    mask = mask_image(MaskSource(tmp_path / "m.png", False, "h"), (48, 32))
    plan = CropPlan(Bucket(32, 32), (48, 32), (48, 32), 8, 0)  # crop x 8..40: the band covers 4 of 32 columns
    grid = render_mask(mask, plan, flip=False, grid=(4, 4))
    expected = values[:, 8:40].astype(np.float32).reshape(4, 8, 4, 8).mean(axis=(1, 3)) / 255
    assert np.array_equal(grid[0].numpy(), expected) and expected[0].tolist() == [0.5, 0, 0, 0]
    flipped = render_mask(mask, plan, flip=True, grid=(4, 4))
    assert np.array_equal(flipped[0].numpy(), expected[:, ::-1])


def test_masked_out_latents_give_exactly_no_gradient():
    torch.manual_seed(0)
    prediction = torch.randn(2, 4, 4, 4, requires_grad=True)
    target = torch.randn(2, 4, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0  # the top half learns
    mask[1, :, :2, :2] = 0.25
    loss = diffusion_loss(prediction, target, torch.ones(2), mask)
    loss.backward()
    assert torch.count_nonzero(prediction.grad[:, :, 2:]) == 0  # not one gradient from the masked half
    assert torch.count_nonzero(prediction.grad[:, :, :2]) == 2 * 4 * 2 * 4
    squared = (prediction.detach() - target) ** 2
    weights = mask.expand_as(squared)
    by_hand = ((squared * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))).mean()
    assert torch.allclose(loss, by_hand, rtol=1e-6)


def test_masks_are_matched_by_name_and_their_problems_listed(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    examples = []
    for name in ("a", "sub/b", "c"):
        Image.new("RGB", (20, 10)).save(root / f"{name}.png")
        examples.append(Example(root / f"{name}.png", "x", 1, None, name, (20, 10), "."))
    masks = tmp_path / "masks"
    (masks / "sub").mkdir(parents=True)
    Image.new("L", (40, 20), 255).save(masks / "a.jpg")  # twice the size, same shape: resized
    Image.new("L", (20, 20), 0).save(masks / "sub" / "b.png")  # another shape
    Image.new("L", (20, 10), 0).save(masks / "orphan.png")
    scan = scan_masks(examples, root, masks, alpha=False)
    assert [s.path.name if s else None for s in scan.sources] == ["a.jpg", "b.png", None]
    assert scan.orphans == [masks / "orphan.png"] and scan.coverage == [1.0]
    assert len(scan.misshapen) == 1 and "is 20x20 but its image is 20x10" in scan.misshapen[0]
    assert scan.describe("--masks m") == "masks: 2 of 3 images (--masks m), mean coverage 100%"
    with pytest.raises(DatasetError, match="no mask matches an image"):  # a wrong folder, not a choice
        scan_masks(examples[2:], root, masks, alpha=False)


def test_an_alpha_mask_is_the_image_s_own_transparency(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:4, :, 3] = 255  # the top half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "opaque.png")
    examples = [Example(tmp_path / n, "x", 1, None, n, (8, 8), ".") for n in ("cut.png", "opaque.png")]
    scan = scan_masks(examples, tmp_path, None, alpha=True)
    assert scan.sources[1] is None and scan.coverage == [0.5]  # an opaque image learns everywhere


def test_the_mask_is_in_the_cache_key():
    plan = CropPlan(Bucket(16, 16), (16, 16), (16, 16), 0, 0)
    plain = LatentRequest("img", Path("a.png"), plan)
    masked = LatentRequest("img", Path("a.png"), plan, mask=MaskSource(Path("m.png"), False, "m1"))
    other = LatentRequest("img", Path("a.png"), plan, mask=MaskSource(Path("m.png"), False, "m2"))
    keys = {latent_key(r, model_identity="x", scaling_factor=1.0) for r in (plain, masked, other)}
    assert len(keys) == 3


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="both given: choose one source of masks"):
        TrainConfig(data_dir="d", masks="m", alpha_mask=True)
    with pytest.raises(ConfigError, match="--unmasked-weight: needs masks"):
        TrainConfig(data_dir="d", unmasked_weight=0.5)
    with pytest.raises(ConfigError, match=r"--unmasked-weight: must be in \[0, 1\]"):
        TrainConfig(data_dir="d", masks="m", unmasked_weight=2.0)


def test_check_and_the_plan_say_what_is_masked(workspace, tmp_path):
    masks = _masks(tmp_path, "half", _left_half, count=6)
    report = check_folder(TrainConfig(data_dir=str(workspace / "stripes"), masks=str(masks))).render()
    assert f"masks: 6 of 8 images (--masks {masks}), mean coverage 50%" in report
    assert "2 images without a mask (they learn everywhere):\n    6.png\n    7.png" in report
    config = tiny_train_config(workspace, tmp_path / "out", data="stripes", masks=str(masks), max_steps=1)
    trainer.train(config, progress=False)
    plan = (tmp_path / "out" / "stripes.run" / "plan.txt").read_text()
    assert (
        f"loss        masks: 6 of 8 images (--masks {masks}), mean coverage 50%, unmasked pixels weigh 0"
        in plan
    )


@pytest.mark.parametrize("cache_latents", [True, False])
def test_an_all_black_mask_trains_nothing(workspace, tmp_path, cache_latents):
    """Every latent masked out: the loss has no gradient anywhere, so every B stays exactly zero (cached
    latents with their masks, or pixels with the mask averaged down at the loss)."""
    black = _masks(tmp_path, "black", lambda _: np.zeros((16, 16)))
    config = tiny_train_config(
        workspace,
        tmp_path / "out",
        data="stripes",
        masks=str(black),
        max_steps=3,
        cache_latents=cache_latents,
    )
    weights = load_file(str(trainer.train(config, progress=False)))
    ups = [value for key, value in weights.items() if key.endswith("lora_B.weight")]
    assert ups and all(torch.count_nonzero(up) == 0 for up in ups)
    half = _masks(tmp_path, "half", _left_half)
    config = tiny_train_config(workspace, tmp_path / "out2", data="stripes", masks=str(half), max_steps=3)
    weights = load_file(str(trainer.train(config, progress=False)))
    assert any(torch.count_nonzero(v) for k, v in weights.items() if k.endswith("lora_B.weight"))
