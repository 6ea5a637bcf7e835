"""render(), image_grid() and PNG parameters on the tiny kwargs-built pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.errors import ConfigError
from difflora.generation import pipeline as P
from difflora.generation import schedulers as S
from tests.support.images import read_png_parameters


@pytest.mark.parametrize("scheduler", ["euler", "euler-a", "dpm++-2m", "ddim"])
def test_render_is_deterministic_per_seed_whatever_else_is_rendered(pipeline, scheduler):
    pair = P.render(pipeline, ["a red circle", "a blue square"], seeds=[3, 4], steps=3, scheduler=scheduler)
    alone = P.render(pipeline, ["a red circle"], seeds=[3], steps=3, scheduler=scheduler)
    assert np.array_equal(np.asarray(pair[0]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(pair[0]), np.asarray(pair[1]))
    assert pair[0].size == P.default_size(pipeline) == (16, 16)


def test_render_restores_the_scheduler_and_reports_progress(pipeline):
    original = pipeline.scheduler
    seen = []
    P.render(
        pipeline,
        ["x", "y"],
        seeds=[0, 1],
        steps=2,
        scheduler="ddim",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert pipeline.scheduler is original
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_render_refuses_unknown_scheduler_with_suggestion(pipeline):
    with pytest.raises(ConfigError, match=r"Did you mean 'euler-a'") as error:
        P.render(pipeline, ["x"], seeds=[0], steps=1, scheduler="euler_a")
    assert "dpm++-2m" in str(error.value)
    assert pipeline.scheduler.__class__.__name__ == "EulerDiscreteScheduler"


def test_schedulers_map_names_to_diffusers_classes():
    assert S.SCHEDULERS["euler"].__name__ == "EulerDiscreteScheduler"
    assert set(S.SCHEDULERS) == set(SCHEDULER_NAMES)


def test_image_grid_places_each_image_in_its_cell():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (10, 8), c) for c in colours]
    sheet = P.image_grid(images, rows=2, cols=2, padding=2)
    assert sheet.size == (2 * 12 + 2, 2 * 10 + 2)
    assert sheet.getpixel((2 + 5, 2 + 4)) == colours[0]
    assert sheet.getpixel((14 + 5, 2 + 4)) == colours[1]
    assert sheet.getpixel((2 + 5, 12 + 4)) == colours[2]
    assert sheet.getpixel((14 + 5, 12 + 4)) == (255, 255, 255)
    labelled = P.image_grid(images, rows=1, cols=3, labels=["a", "b", "a very long label indeed"])
    assert labelled.height > 8 + 4
    with pytest.raises(ValueError):
        P.image_grid(images, rows=1, cols=2)


def test_png_carries_a1111_parameters_and_json_sidecar(tmp_path):
    text = P.a1111_parameters(
        prompt="a striped cat",
        negative_prompt="blurry",
        steps=12,
        scheduler="dpm++-2m",
        guidance=4.5,
        seed=42,
        width=64,
        height=48,
        model="embedded",
        adapters=[("style", 0.7, 0.5), ("subject", -0.25, -0.25)],
    )
    path = P.save_png(Image.new("RGB", (64, 48)), tmp_path / "img.png", parameters=text, sidecar={"seed": 42})
    stored = read_png_parameters(path)
    first, negative, fields = stored.split("\n")
    assert first == "a striped cat <lora:style:0.7> <lora:subject:-0.25>"
    assert negative == "Negative prompt: blurry"
    parsed = dict(item.split(": ", 1) for item in fields.split(", "))
    assert parsed["Steps"] == "12" and parsed["Sampler"] == "DPM++ 2M" and parsed["CFG scale"] == "4.5"
    assert parsed["Seed"] == "42" and parsed["Size"] == "64x48" and parsed["Model"] == "embedded"
    assert parsed["difflora adapters"] == '"style:0.7:0.5,subject:-0.25:-0.25"'
    assert json.loads((tmp_path / "img.json").read_text()) == {"seed": 42}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.json", "img.png"]  # no temporary files left
