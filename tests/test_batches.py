"""Batches: one bucket each, every example `repeats` times per epoch, order a pure function of
(seed, epoch) so that resuming at batch k gives exactly the batches an uninterrupted run would have."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from difflora.data.batches import BucketBatchSampler, TrainingDataset, collate, plan_examples
from difflora.data.buckets import Bucket, make_buckets
from difflora.data.captions import CaptionAugmentation
from difflora.data.scan import scan_folder
from difflora.errors import ConfigError
from difflora.training.plan import make_plan
from tests.support.images import make_simple_folder, noise_rgb

WIDE, TALL, SQUARE = Bucket(96, 32), Bucket(32, 96), Bucket(64, 64)


def _sampler(**kwargs):
    buckets = [WIDE, WIDE, TALL, SQUARE, SQUARE, SQUARE]
    repeats = [1, 3, 2, 1, 1, 2]
    return BucketBatchSampler(
        buckets, repeats, kwargs.pop("batch_size", 2), seed=kwargs.pop("seed", 7), **kwargs
    )


def test_batches_are_single_bucket_and_cover_repeats():
    sampler = _sampler()
    batches = sampler.batches(0)
    assert all(len({sampler.buckets[d.index] for d in batch}) == 1 for batch in batches)
    assert Counter(d.index for batch in batches for d in batch) == {0: 1, 1: 3, 2: 2, 3: 1, 4: 1, 5: 2}
    # wide: 4 draws -> 2 batches; tall: 2 -> 1; square: 4 -> 2
    assert len(batches) == sampler.batches_per_epoch == len(sampler) == 5
    assert _sampler(drop_last=True, batch_size=3).batches_per_epoch == 2


def test_order_is_a_pure_function_of_seed_and_epoch_and_resume_skips_exactly():
    sampler = _sampler(flip=True)
    assert sampler.batches(3) == _sampler(flip=True).batches(3)
    assert sampler.batches(3) != sampler.batches(4)
    assert _sampler(seed=8).batches(3) != sampler.batches(3)
    full = list(sampler)  # epoch 0 by default
    sampler.set_epoch(2)
    uninterrupted = list(sampler)
    sampler.set_epoch(2, skip_batches=2)
    assert list(sampler) == uninterrupted[2:] and len(sampler) == 3
    assert full == sampler.batches(0)
    flips = [d.flip for e in range(20) for b in sampler.batches(e) for d in b]
    assert 0.3 < sum(flips) / len(flips) < 0.7


def test_loader_yields_bucket_sized_pixels_and_augmented_captions(tmp_path):
    make_simple_folder(tmp_path / "3_a", count=3, size=(48, 32))
    noise_rgb((32, 48)).save(tmp_path / "3_a" / "tall.png")
    result = scan_folder(tmp_path, trigger="sks")
    plans = plan_examples(result.examples, make_buckets(32, 16), step=16)
    sampler = BucketBatchSampler([p.bucket for p in plans], [e.repeats for e in result.examples], 2, seed=1)
    augmentation = CaptionAugmentation(shuffle_tags=True, keep_tokens=1)
    dataset = TrainingDataset(result.examples, plans, augmentation=augmentation, random_crop=True)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == sampler.batches_per_epoch
    for batch in batches:
        height, width = batch["target_size"][0].tolist()
        assert batch["pixels"].shape[1:] == (3, height, width)
        assert all(c.split(", ")[0] == "sks" for c in batch["caption"])  # kept first tag
    second = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(batches, second, strict=True))


def test_plan_rule_and_explicit_lengths():
    def plan(batches, **kw):
        return make_plan(
            images=batches, examples_per_epoch=batches, batches_per_epoch=batches, batch_size=1, **kw
        )

    assert (plan(2).epochs, plan(2).max_steps) == (150, 300)  # floor of 300 steps
    assert (plan(20).epochs, plan(20).max_steps) == (15, 300)  # 10 epochs would be under the floor
    assert (plan(40).epochs, plan(40).max_steps) == (10, 400)  # 10 epochs
    assert (plan(300).epochs, plan(300).max_steps) == (6, 1800)  # whole epochs under 2000
    assert (plan(5000).epochs, plan(5000).max_steps) == (1, 2000)  # one epoch, cut
    assert (plan(20, epochs=3).max_steps, plan(20, max_steps=45).epochs) == (60, 3)
    accumulated = make_plan(
        images=9, examples_per_epoch=9, batches_per_epoch=9, batch_size=1, gradient_accumulation=4
    )
    assert accumulated.steps_per_epoch == 3
    with pytest.raises(ConfigError, match="choose one"):
        plan(20, epochs=3, max_steps=10)
