"""Scanning folders as users have them: every usable image found, everything else reported with a reason."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from difflora.data.captions import augment_caption, decode_text, rough_token_count
from difflora.data.scan import load_image, scan_folder
from difflora.errors import DatasetError
from tests.support.images import BLUE, RED, make_messy_folder, make_simple_folder, noise_rgb


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    expected = make_messy_folder(root)
    return root, expected, scan_folder(root)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def test_every_usable_image_found_and_every_bad_file_reported(messy):
    root, expected, result = messy
    found = {_rel(root, e.path): e.size for e in result.examples}
    assert found == expected.usable  # sizes are after EXIF rotation
    skipped = {_rel(root, s.path): s.reason for s in result.skipped}
    assert set(skipped) == set(expected.skipped)
    for name, word in expected.skipped.items():
        assert word in skipped[name].lower(), (name, skipped[name])
    # hidden files / folders are not looked at; notes.md is listed as ignored, not as an image
    assert not any(".hidden" in str(p) or ".thumbs" in str(p) for p in [e.path for e in result.examples])
    assert [_rel(root, p) for p in result.ignored] == ["plain/notes.md"]


def test_captions_utf8_bom_latin1_metadata_and_fallbacks(messy):
    root, expected, result = messy
    captions = {_rel(root, e.path): e.caption for e in result.examples}
    for name, caption in expected.captions.items():
        assert captions[name] == caption, name
    # missing / empty captions fall back to the folder's class name and are listed
    for name in expected.missing:
        assert captions[name] == "dog"
    listed = {_rel(root, i.path) for i in result.caption_issues if i.kind in ("missing", "empty")}
    assert listed == expected.missing
    decoding = [i for i in result.caption_issues if i.kind == "decoding"]
    assert [_rel(root, i.path) for i in decoding] == ["10_dog/gray16.txt"]
    assert "cp1252" in decoding[0].message
    orphans = [_rel(root, i.path) for i in result.caption_issues if i.kind == "orphan"]
    assert orphans == ["plain/orphan.txt"]
    sources = {_rel(root, e.path): e.caption_source for e in result.examples}
    assert sources["10_dog/nested/ANIM.GIF"] == ".caption"
    assert sources["2_meta/m1.png"] == "metadata.jsonl"


def test_repeats_folders_tags_duplicates_and_hash(messy):
    root, _, result = messy
    repeats = {_rel(root, e.path): e.repeats for e in result.examples}
    assert repeats["10_dog/nested/ANIM.GIF"] == 10  # nested folders inherit their N_name ancestor
    assert repeats["2_meta/m1.png"] == 2
    assert repeats["plain/ok.jpg"] == 1
    assert any("'plain' has no N_ repeat prefix" in w for w in result.warnings)
    assert result.dataset_dirs["10_dog"] == {"n_repeats": 10, "img_count": 10}
    assert result.tag_frequency["10_dog"]["a dog"] == 1
    assert [sorted(_rel(root, p) for p in g) for g in result.duplicates.values()] == [
        ["10_dog/rgb.png", "plain/dup.png"]
    ]
    assert len(result.dataset_hash) == 64


def test_loaded_pixels_are_normalised(messy):
    root, _, _ = messy
    rotated = np.asarray(load_image(root / "10_dog/rotated.jpg"), dtype=int)
    assert rotated.shape == (80, 40, 3)  # stored 80x40 with orientation 6 -> displayed 40 wide, 80 high
    assert np.abs(rotated[10, 20] - RED).max() < 30 and np.abs(rotated[70, 20] - BLUE).max() < 30
    assert np.abs(np.asarray(load_image(root / "10_dog/cmyk.jpg"))[16, 16].astype(int) - RED).max() < 30
    gray = np.asarray(load_image(root / "10_dog/gray16.png"), dtype=int)[..., 0]
    source = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16) / 257.0
    assert np.abs(gray - np.rint(source)).max() <= 1  # scaled from 16 bits, not clipped at 255
    rgba = np.asarray(load_image(root / "10_dog/rgba.png"), dtype=int)
    assert tuple(rgba[8, 4]) == BLUE and tuple(rgba[8, 28]) == (255, 255, 255)  # transparent -> white
    palette = np.asarray(load_image(root / "10_dog/palette.gif"), dtype=int)
    assert tuple(palette[8, 2]) == (255, 255, 255) and tuple(palette[8, 12]) == RED
    assert tuple(np.asarray(load_image(root / "10_dog/nested/ANIM.GIF"))[0, 0]) == RED  # first frame


def test_trigger_is_prepended_and_used_for_missing_captions(tmp_path):
    paths = make_simple_folder(tmp_path, count=2)
    paths[1].with_suffix(".txt").unlink()
    (tmp_path / "x.txt").write_text("[trigger] style, tree", encoding="utf-8")
    noise_rgb((16, 16)).save(tmp_path / "x.png")
    result = scan_folder(tmp_path, trigger="sks")
    captions = {e.path.name: e.caption for e in result.examples}
    assert captions == {
        "img0.png": "sks, image 0, tag a, tag b",
        "img1.png": "sks",
        "x.png": "sks style, tree",
    }
    assert [i.path.name for i in result.caption_issues] == ["img1.png"]


def test_txt_and_caption_disagreeing_is_an_error(tmp_path):
    make_simple_folder(tmp_path, count=2)
    (tmp_path / "img0.caption").write_text("something else", encoding="utf-8")
    (tmp_path / "img1.caption").write_text("image 1, tag a, tag b", encoding="utf-8")  # agrees: fine
    with pytest.raises(DatasetError, match=r"img0\.png: caption sources disagree"):
        scan_folder(tmp_path)
    result = scan_folder(tmp_path, strict=False)
    assert [(i.path.name, i.level) for i in result.caption_issues] == [("img0.png", "error")]
    assert (
        scan_folder(tmp_path, caption_extension=".caption", strict=False).examples[0].caption
        == "something else"
    )


def test_metadata_csv_and_nothing_usable(tmp_path):
    noise_rgb((16, 16)).save(tmp_path / "a.jpeg")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.jpeg,"from csv, tags"\nghost.png,x\n')
    result = scan_folder(tmp_path)
    assert result.examples[0].caption == "from csv, tags"
    assert any("ghost.png" in i.message for i in result.caption_issues)

    empty = tmp_path / "bad"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="no usable image.*1 image file"):
        scan_folder(empty)
    with pytest.raises(DatasetError, match="no image found"):
        scan_folder(_mkdir(tmp_path / "none"))
    with pytest.raises(DatasetError, match="not a folder"):
        scan_folder(tmp_path / "missing")


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_long_captions_reported_with_given_counter(tmp_path):
    make_simple_folder(tmp_path, count=1)
    result = scan_folder(tmp_path, max_tokens=3, count_tokens=rough_token_count)
    assert [i.kind for i in result.caption_issues] == ["too_long"]
    assert "8 tokens" in result.caption_issues[0].message  # image 0 , tag a , tag b


def test_zero_repeat_folder_is_excluded_and_listed(tmp_path):
    make_simple_folder(tmp_path / "0_off", count=1)
    make_simple_folder(tmp_path / "3_on", count=1)
    result = scan_folder(tmp_path)
    assert [e.repeats for e in result.examples] == [3]
    assert "0 repeats" in result.skipped[0].reason


def test_decode_text_variants():
    assert decode_text("é".encode()) == ("é", None)
    assert decode_text(b"\xef\xbb\xbfhi") == ("hi", None)
    assert decode_text("hi".encode("utf-16")) == ("hi", None)
    text, warning = decode_text("naïve".encode("latin-1"))
    assert text == "naïve" and "not valid UTF-8" in warning


def test_augment_caption_keeps_first_tags_and_is_seeded():
    caption = "sks, a, b, c, d, e"
    out = augment_caption(caption, shuffle_tags=True, keep_tokens=1, rng=random.Random(1))
    tags = out.split(", ")
    assert tags[0] == "sks" and sorted(tags[1:]) == ["a", "b", "c", "d", "e"]
    again = augment_caption(caption, shuffle_tags=True, keep_tokens=1, rng=random.Random(1))
    assert out == again
    shuffles = {
        augment_caption(caption, shuffle_tags=True, keep_tokens=1, rng=random.Random(s)) for s in range(20)
    }
    assert len(shuffles) > 5
    kept = augment_caption("x, y ||| p, q", shuffle_tags=True, rng=random.Random(0))
    assert kept.startswith("x, y, ") and sorted(kept.split(", ")[2:]) == ["p", "q"]
    drops = [augment_caption(caption, dropout_rate=0.3, rng=random.Random(s)) for s in range(400)]
    assert 0.22 < drops.count("") / 400 < 0.38
    assert augment_caption(caption, rng=random.Random(0)) == caption
