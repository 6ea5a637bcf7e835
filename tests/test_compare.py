"""Whole, readable labels on every grid, and `difflora generate --compare`: which file each column composes
(checkpoints by step, folders, weights), and a grid whose cells are the images an ordinary generate of that
adapter renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from difflora.cli import cli
from difflora.config.spec import AdapterWeight
from difflora.errors import AdapterSpecError
from difflora.generation.compare import compare_columns
from difflora.generation.labels import MIN_FONT, MIN_LABEL_WIDTH, font_for, labelled_table, line_height, wrap
from difflora.generation.pipeline import image_grid

LONG = "seed 1: a yellow submarine under a violet sky with extraordinarilylongunbrokenwordthatneedsbreaking"


def _width(text: str, font) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def test_wrap_keeps_every_character_within_the_width():
    font = font_for(16)
    assert font.size >= MIN_FONT  # readable however small the images
    lines = wrap(LONG, font, MIN_LABEL_WIDTH)
    assert len(lines) > 2 and all(_width(line, font) <= MIN_LABEL_WIDTH for line in lines)
    assert "".join(lines).replace(" ", "") == LONG.replace(" ", "")  # nothing cut, no ellipsis
    assert lines[0] == "seed 1: a yellow"  # words stay whole where they fit


def test_grid_labels_are_whole_and_stay_in_their_column():
    images = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    sheet = image_grid(images, rows=1, cols=2, labels=[LONG, "seed 2: short"], padding=2)
    font = font_for(16)
    lines = len(wrap(LONG, font, MIN_LABEL_WIDTH))
    assert sheet.size == (2 * (MIN_LABEL_WIDTH + 2) + 2, 16 + lines * line_height(font) + 2 + 2 + 2)
    pixels = np.asarray(sheet)
    gap = pixels[18:, 2 + MIN_LABEL_WIDTH : 2 + MIN_LABEL_WIDTH + 2]  # between the columns' label areas
    assert (gap == 255).all()  # no label runs into its neighbour
    assert (pixels[18:, 2:MIN_LABEL_WIDTH] < 128).any()  # the text is there
    centre = 2 + (MIN_LABEL_WIDTH - 16) // 2 + 8
    assert tuple(pixels[8, centre]) == (255, 0, 0)  # each image centred in its column


def test_labelled_table_places_cells_under_their_headers():
    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
    cells = [[Image.new("RGB", (32, 24), c) for c in row] for row in colours]
    table = labelled_table(cells, ["seed 1", "seed 2"], ["style@step-150", LONG], title="a prompt " * 30)
    pixels = np.asarray(table)
    found = {
        tuple(pixels[y, x])
        for y in range(table.height)
        for x in range(0, table.width, 4)
        if tuple(pixels[y, x]) in {c for row in colours for c in row}
    }
    assert found == {c for row in colours for c in row}
    red = np.argwhere((pixels == (255, 0, 0)).all(axis=2))
    blue = np.argwhere((pixels == (0, 0, 255)).all(axis=2))
    assert red[:, 0].max() < blue[:, 0].min() and red[:, 1].min() == blue[:, 1].min()  # rows, one column


def _checkpoint(adapters: Path, source: Path, name: str, step: int) -> Path:
    folder = adapters / f"{name}.run" / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    return Path(shutil.copy(source, folder / "adapter.safetensors"))


def test_compare_columns_resolve_checkpoints_folders_and_weights(model_and_adapters, tmp_path):
    _, adapters = model_and_adapters
    store = tmp_path / "adapters"
    shutil.copytree(adapters, store)
    at_2 = _checkpoint(store, store / "subject.safetensors", "style", 2)
    at_10 = _checkpoint(store, store / "style.safetensors", "style", 10)
    columns = compare_columns(
        [AdapterWeight("style@step-2"), AdapterWeight("style", 0.5), AdapterWeight(str(store / "style.run"))],
        [store],
    )
    assert [c.label for c in columns] == ["style@step-2", "style ×0.5", "style@step-2", "style@step-10"]
    assert [Path(c.spec.name) for c in columns] == [at_2, store / "style.safetensors", at_2, at_10]
    assert columns[1].spec.weight == 0.5
    with pytest.raises(AdapterSpecError, match=r"no checkpoint at step 7 .* kept: step-2, step-10"):
        compare_columns([AdapterWeight("style@7"), AdapterWeight("style")], [store])
    with pytest.raises(AdapterSpecError, match="at least two"):
        compare_columns([AdapterWeight("style")], [store])


def test_generate_compare_cells_are_what_each_adapter_renders(model_and_adapters, tmp_path):
    model, adapters = model_and_adapters
    common = ["--model", str(model), "--adapter-dir", str(adapters), "--steps", "2", "--seed", "5"]
    out = tmp_path / "grid"
    result = CliRunner().invoke(
        cli,
        ["generate", "a red circle", *common, "-n", "2", "--compare", "style,subject:0.5", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["00000-5.png", "00001-6.png", "00002-5.png", "00003-6.png", "00004-compare.png"]
    sidecar = json.loads((out / "00004-compare.json").read_text())
    assert [c["label"] for c in sidecar["compare"]] == ["style", "subject ×0.5"]
    for cell, spec in (("00000-5.png", "style"), ("00003-6.png", "subject:0.5")):
        alone = tmp_path / spec.replace(":", "-")
        seed = cell.split("-")[1].removesuffix(".png")
        args = ["generate", "a red circle", *common, "--seed", seed, "--adapters", spec, "--out", str(alone)]
        assert CliRunner().invoke(cli, args).exit_code == 0
        assert np.array_equal(
            np.asarray(Image.open(out / cell)), np.asarray(Image.open(alone / f"00000-{seed}.png"))
        )
    grid = Image.open(out / "00004-compare.png")
    assert grid.width >= 2 * MIN_LABEL_WIDTH and grid.height > 2 * 16
    bad = CliRunner().invoke(
        cli, ["generate", "x", *common, "--compare", "style,subject", "--sweep", "style:0,1"]
    )
    assert bad.exit_code != 0 and "--compare and --sweep each make a grid" in bad.output


def test_generate_compare_with_several_prompts_has_a_row_per_prompt_and_seed(model_and_adapters, tmp_path):
    from difflora.composition.composer import Composer
    from difflora.config.generate import GenerateConfig
    from difflora.generation.generate import generate
    from difflora.models.loading import load_pipeline

    model, adapters = model_and_adapters
    common = ["--model", str(model), "--adapter-dir", str(adapters), "--steps", "2"]
    out = tmp_path / "grid"
    args = ["generate", "a red circle", *common, "--seed", "5", "-n", "2", "--compare", "style,subject:0.5"]
    result = CliRunner().invoke(cli, [*args, "--compare-prompt", "a blue square", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # per column (style, then subject): red circle seeds 5, 6, then blue square seeds 5, 6
    cells = {
        (column, prompt, seed): f"{4 * c + 2 * p + s:05d}-{seed}.png"
        for c, column in enumerate(("style", "subject:0.5"))
        for p, prompt in enumerate(("a red circle", "a blue square"))
        for s, seed in enumerate((5, 6))
    }
    assert sorted(p.name for p in out.glob("*.png")) == sorted([*cells.values(), "00008-compare.png"])
    sidecar = json.loads((out / "00008-compare.json").read_text())
    assert sidecar["prompts"] == ["a red circle", "a blue square"] and sidecar["prompt"] == "a red circle"
    composer = Composer(load_pipeline(model))  # one model for the cells rendered alone (the library API)
    for column, prompt, seed in (("style", "a blue square", 5), ("subject:0.5", "a blue square", 6)):
        cell = out / cells[column, prompt, seed]
        assert json.loads(cell.with_suffix(".json").read_text())["prompt"] == prompt
        alone = tmp_path / f"{column}-{seed}".replace(":", "-")
        config = GenerateConfig(
            prompt=prompt,
            adapters=(column,),
            adapter_dir=(str(adapters),),
            steps=2,
            seed=seed,
            out=str(alone),
        )
        assert np.array_equal(
            np.asarray(Image.open(cell)), np.asarray(Image.open(generate(config, composer=composer)[0]))
        )
    # the grid is the labelled table of those cells, a row per prompt and seed, pixel for pixel
    rows = [
        [Image.open(out / cells[column, prompt, seed]).convert("RGB") for column in ("style", "subject:0.5")]
        for prompt in ("a red circle", "a blue square")
        for seed in (5, 6)
    ]
    labels = [f"seed {s}: {p}" for p in ("a red circle", "a blue square") for s in (5, 6)]
    want = labelled_table(rows, labels, ["style", "subject ×0.5"])
    assert np.array_equal(np.asarray(Image.open(out / "00008-compare.png").convert("RGB")), np.asarray(want))
    alone = CliRunner().invoke(cli, ["generate", "x", *common, "--compare-prompt", "y"])
    assert alone.exit_code != 0 and "goes with --compare" in alone.output
