"""`difflora check`: the preflight report says what training would use, skip and plan."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from difflora.cli import cli
from difflora.data.captions import TokenCounter, clip_token_counter
from difflora.models.geometry import model_geometry
from difflora.training.check import CheckReport, check_dataset
from difflora.training.plan import DataSettings, Tokens
from tests.support.images import make_messy_folder, make_simple_folder
from tests.support.models import tiny_pipeline, tiny_tokenizer


def run_check(
    root: Path,
    *,
    caption_extension: str = ".txt",
    trigger: str | None = None,
    resolution: int = 512,
    step: int = 64,
    no_upscale: bool = False,
    batch_size: int = 1,
    gradient_accumulation: int = 1,
    max_steps: int | None = None,
    epochs: int | None = None,
    max_tokens: int | None = 75,
    count_tokens: TokenCounter | None = None,
) -> CheckReport:
    """`check_dataset` with the settings spelled out (training's other knobs at their defaults)."""
    settings = DataSettings(
        root=Path(root),
        caption_extension=caption_extension,
        trigger=trigger,
        resolution=resolution,
        bucket_step=step,
        no_upscale=no_upscale,
        random_crop=False,
        flip=False,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        max_steps=max_steps,
        epochs=epochs,
        seed=0,
    )
    return check_dataset(settings, Tokens(max_tokens, count_tokens))


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    make_messy_folder(root)
    return root


def test_report_on_a_messy_folder(messy_root):
    report = run_check(messy_root, resolution=64, step=16, trigger="sks")
    assert report.ok and len(report.scan.examples) == 14
    assert sum(report.histogram.values()) == 14
    assert all(b.width % 16 == 0 and b.height % 16 == 0 for b in report.histogram)
    assert len(report.upscaled) == 14  # every fixture image is smaller than 64x64
    # the plan counts repeats: 10 images × 10 + 2 × 2 + 2 × 1 = 106 examples, batch 1
    assert report.plan.examples_per_epoch == 106 and report.plan.max_steps == 1060
    text = report.render()
    for expected in (
        "14 usable image(s)",
        "plain/corrupt.png: not an image",
        "plain/truncated.jpg: truncated",
        "plain/empty.png: empty file",
        "plain/bomb.png: decompression bomb",
        "10_dog/rgba.png: no caption",
        "10_dog/palette.gif: caption is empty",
        "10_dog/gray16.txt: not valid UTF-8",
        "plain/orphan.txt",
        "'plain' has no N_ repeat prefix",
        "10_dog/rgb.png = plain/dup.png",
        "1× CMYK converted to RGB",
        "1× EXIF orientation 6",
        "64x64",
        "106 examples per epoch",
        "OK: ready to train",
    ):
        assert expected in text, expected
    no_upscale = run_check(messy_root, resolution=64, step=16, no_upscale=True)
    assert no_upscale.upscaled == [(p, f) for p, f in no_upscale.upscaled if f > 1]  # only sub-step images
    assert len(no_upscale.upscaled) < 14


def test_token_limit_uses_the_tokenizer_when_given(tmp_path):
    make_simple_folder(tmp_path / "data", count=1)  # "image 0, tag a, tag b"
    tokenizer = tiny_tokenizer(tmp_path / "tok")  # byte-level vocabulary, no merges: a token per character
    length = len(tokenizer.tokenize("image 0, tag a, tag b"))
    report = run_check(tmp_path / "data", max_tokens=length - 1, count_tokens=clip_token_counter(tokenizer))
    issues = [i for i in report.scan.caption_issues if i.kind == "too_long"]
    assert len(issues) == 1 and f"caption is {length} tokens" in issues[0].message
    exact = run_check(tmp_path / "data", max_tokens=length, count_tokens=clip_token_counter(tokenizer))
    assert not [i for i in exact.scan.caption_issues if i.kind == "too_long"]
    assert "(estimated)" not in report.render()
    assert "(estimated)" in run_check(tmp_path / "data", max_tokens=3).render()


def test_cli_exit_codes(tmp_path):
    make_simple_folder(tmp_path / "ok", count=2)
    runner = CliRunner()
    args = ["check", str(tmp_path / "ok"), "--resolution", "64", "--epochs", "3", "--batch-size", "1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 images, 2 examples per epoch" in result.output and "3 epoch(s), 6 steps" in result.output

    (tmp_path / "ok" / "img0.caption").write_text("different", encoding="utf-8")
    result = runner.invoke(cli, ["check", str(tmp_path / "ok")])
    assert result.exit_code == 1 and "NOT READY" in result.output and "disagree" in result.output

    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["check", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no image found" in result.output

    result = runner.invoke(cli, ["check", str(tmp_path / "ok"), "--resolution", "100"])
    assert result.exit_code == 2 and "--resolution" in result.output
    result = runner.invoke(cli, ["check", str(tmp_path / "ok"), "--epochs", "2", "--max-steps", "5"])
    assert result.exit_code == 2 and "choose one" in result.output


def test_cli_reads_the_model_geometry_and_tokenizer(tmp_path):
    """Buckets, step and token limit come from the model's config files, as training will use them."""
    tiny_pipeline(tmp_path / "build").save_pretrained(tmp_path / "model")
    geometry = model_geometry(str(tmp_path / "model"))
    # tiny VAE: 2 blocks -> factor 2; tiny UNet: 2 blocks -> 1 downsampling; sample_size 8
    assert (geometry.resolution, geometry.step, geometry.max_tokens) == (16, 4, 14)
    make_simple_folder(tmp_path / "data", count=2, size=(24, 16))
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "data"), "--model", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "Buckets (resolution 16, step 4" in result.output and "Note:" not in result.output
