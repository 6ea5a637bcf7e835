"""Latent and text caches: computed once, equal to a direct VAE encode, reused, and invalidated by
themselves when the image, the crop, the flip or the model changes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from difflora.data.batches import BucketBatchSampler, TrainingDataset, collate, latent_requests, plan_examples
from difflora.data.buckets import make_buckets, render_pixels
from difflora.data.cache import LatentCache, TextEmbeddingCache, text_cache_allowed, vae_encoder
from difflora.data.captions import CaptionAugmentation
from difflora.data.scan import load_image, scan_folder
from difflora.errors import DatasetError
from tests.support.images import make_simple_folder, noise_rgb
from tests.support.models import tiny_vae


class Counting:
    """Wraps an encode function and counts how many items it encoded."""

    def __init__(self, encode):
        self.encode, self.items = encode, 0

    def __call__(self, batch):
        self.items += len(batch)
        return self.encode(batch)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae().eval()


def _setup(tmp_path, flip=False):
    make_simple_folder(tmp_path / "img", count=3, size=(48, 32))
    noise_rgb((32, 32), 9).save(tmp_path / "img" / "square.png")
    scan = scan_folder(tmp_path / "img")
    plans = plan_examples(scan.examples, make_buckets(32, 16), step=16)
    requests, slots = latent_requests(scan.examples, plans, flip=flip)
    return scan, plans, requests, slots


def test_latents_computed_once_and_equal_to_direct_encode(tmp_path, vae):
    _, _, requests, slots = _setup(tmp_path, flip=True)
    cache = LatentCache(tmp_path / "cache")
    encode = Counting(vae_encoder(vae))
    first = cache.build(requests, encode, model_identity="vae-A", scaling_factor=0.18215, batch_size=3)
    assert (first.computed, first.hits, encode.items) == (8, 0, 8)  # 4 images × both orientations
    again = cache.build(requests, encode, model_identity="vae-A", scaling_factor=0.18215)
    assert (again.computed, again.hits, encode.items) == (0, 8, 8)  # nothing re-encoded
    assert again.keys == first.keys
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temp files
    for key, request in zip(first.keys, requests, strict=True):
        pixels = render_pixels(load_image(request.path), request.plan, flip=request.flip)
        with torch.no_grad():
            posterior = vae.encode(pixels[None]).latent_dist
        moments = cache.load(key)
        assert torch.allclose(moments.mean, posterior.mean[0], atol=1e-5)
        assert torch.allclose(moments.std, posterior.std[0], atol=1e-5)
    mirrored = dict(zip(slots, first.keys, strict=True))
    assert not torch.allclose(cache.load(mirrored[(0, False)]).mean, cache.load(mirrored[(0, True)]).mean)
    sample = cache.load(first.keys[0]).sample(torch.Generator().manual_seed(0))
    assert torch.equal(sample, cache.load(first.keys[0]).sample(torch.Generator().manual_seed(0)))


def test_cache_invalidates_itself(tmp_path, vae):
    scan, plans, requests, _ = _setup(tmp_path)
    cache = LatentCache(tmp_path / "cache")
    encode = Counting(vae_encoder(vae))
    cache.build(requests, encode, model_identity="vae-A", scaling_factor=0.18215)
    assert encode.items == 4
    cache.build(requests, encode, model_identity="vae-B", scaling_factor=0.18215)
    assert encode.items == 8  # another model: everything again
    # edit one image's pixels: a new content hash, only that one is re-encoded
    noise_rgb((48, 32), 77).save(scan.examples[0].path)
    rescanned = scan_folder(tmp_path / "img")
    new_requests, _ = latent_requests(rescanned.examples, plans, flip=False)
    cache.build(new_requests, encode, model_identity="vae-A", scaling_factor=0.18215)
    assert encode.items == 9
    # another crop window (random crop with another seed) is another entry
    other = plan_examples(rescanned.examples, make_buckets(32, 16), step=16, crop="random", seed=5)
    moved = [r for r, p, q in zip(new_requests, other, plans, strict=True) if p != q]
    assert moved  # the 48x32 images have room to move
    cache.build(latent_requests(rescanned.examples, other, flip=False)[0], encode, model_identity="vae-A",
                scaling_factor=0.18215)  # fmt: skip
    assert encode.items == 9 + len(moved)


def test_unreadable_entry_is_recomputed_not_fatal(tmp_path, vae):
    _, _, requests, _ = _setup(tmp_path)
    cache = LatentCache(tmp_path / "cache")
    encode = Counting(vae_encoder(vae))
    build = cache.build(requests, encode, model_identity="m", scaling_factor=1.0)
    path = cache.store.path_for(build.keys[0])
    path.write_bytes(path.read_bytes()[:40])  # a run killed by the OS mid-write on another tool
    again = cache.build(requests, encode, model_identity="m", scaling_factor=1.0)
    assert (again.computed, encode.items) == (1, 5)
    assert cache.load(build.keys[0]).mean.shape == (4, 16, 16)  # tiny VAE: factor 2


def test_a_bit_flipped_entry_is_reported_recomputed_and_never_trained_on(tmp_path, vae, caplog):
    _, _, requests, _ = _setup(tmp_path)
    cache = LatentCache(tmp_path / "cache")
    encode = Counting(vae_encoder(vae))
    build = cache.build(requests, encode, model_identity="m", scaling_factor=1.0)
    path = cache.store.path_for(build.keys[1])
    good = cache.load(build.keys[1]).mean.clone()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit of one float in the tensor data: the header and the size stay valid
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="damaged during the run"):
        cache.load(build.keys[1])  # a run that already checked its cache refuses to train on it
    again = cache.build(requests, encode, model_identity="m", scaling_factor=1.0)
    assert (again.computed, encode.items) == (1, 5)  # found by its checksum, only it recomputed
    assert path.name in caplog.text and "damaged" in caplog.text
    assert torch.allclose(cache.load(build.keys[1]).mean, good, atol=1e-5)  # the same image again


def test_dataset_from_cached_latents_and_text_embeddings(tmp_path, vae):
    scan, plans, requests, slots = _setup(tmp_path, flip=True)
    latents = LatentCache(tmp_path / "cache")
    build = latents.build(requests, vae_encoder(vae), model_identity="m", scaling_factor=1.0)
    augmentation = CaptionAugmentation(dropout_rate=0.5)
    captions = set().union(*(augmentation.possible_captions(e.caption) for e in scan.examples))
    assert "" in captions

    def fake_encode(batch):  # one row per caption: its length, repeated
        return {"hidden": torch.tensor([[float(len(c))] * 3 for c in batch])}

    texts = TextEmbeddingCache(tmp_path / "cache")
    counting = Counting(fake_encode)
    keys, stats = texts.build(captions, counting, encoder_identity="te")
    assert stats.computed == len(captions) == counting.items
    assert texts.build(captions, counting, encoder_identity="te")[1].computed == 0
    assert texts.build(captions, counting, encoder_identity="te2")[1].computed == len(captions)

    dataset = TrainingDataset(
        scan.examples,
        plans,
        augmentation=augmentation,
        latents=(latents, dict(zip(slots, build.keys, strict=True))),
        texts=(texts, keys),
    )
    sampler = BucketBatchSampler([p.bucket for p in plans], [1] * len(plans), 2, seed=0, flip=True)
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
        assert batch["latent_mean"].shape[1:] == (4, *(s // 2 for s in batch["target_size"][0].tolist()))
        expected = torch.tensor([[float(len(c))] * 3 for c in batch["caption"]])
        assert torch.equal(batch["text"]["hidden"], expected)


def test_text_cache_refuses_with_a_reason():
    allowed, why = text_cache_allowed(
        train_text_encoder=False, augmentation=CaptionAugmentation(dropout_rate=0.1)
    )
    assert allowed
    allowed, why = text_cache_allowed(train_text_encoder=True, augmentation=CaptionAugmentation())
    assert not allowed and "trained" in why
    allowed, why = text_cache_allowed(
        train_text_encoder=False, augmentation=CaptionAugmentation(shuffle_tags=True)
    )
    assert not allowed and "shuffl" in why


def test_large_images_are_encoded_one_per_call_small_ones_together(tmp_path, vae, monkeypatch):
    from difflora.data import cache as cache_module

    assert [cache_module.encode_batch(side * side, 4) for side in (64, 256, 320, 512, 1024)] == [
        4,
        4,
        2,
        1,
        1,
    ]
    _, _, requests, _ = _setup(tmp_path)
    sizes: list[int] = []
    encode = vae_encoder(vae)

    def recording(batch):
        sizes.append(len(batch))
        return encode(batch)

    LatentCache(tmp_path / "small").build(requests, recording, model_identity="v", scaling_factor=1.0)
    assert max(sizes) > 1  # the 32x32 and 48x32-bucket images share calls
    sizes.clear()
    monkeypatch.setattr(cache_module, "ENCODE_PIXELS", 16 * 16)  # as if every image were large
    LatentCache(tmp_path / "large").build(requests, recording, model_identity="v", scaling_factor=1.0)
    assert sizes == [1] * len(requests)
