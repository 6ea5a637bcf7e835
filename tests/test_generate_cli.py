"""`difflora generate`, `difflora merge` and `difflora inspect A B` end to end on a tiny saved model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from difflora.cli import cli
from difflora.errors import ConfigError
from difflora.formats.native import save_adapter
from tests.support.adapters import random_adapter
from tests.support.images import read_png_parameters
from tests.support.models import tiny_pipeline


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_pngs_with_parameters_sidecars_and_a_contact_sheet(tmp_path, model_and_adapters):
    model, adapters = model_and_adapters
    out = tmp_path / "out"
    code, output = run(
        "generate", "a red circle", "--model", str(model), "--adapter-dir", str(adapters),
        "--adapters", "style:0.7:0.4", "--adapter", "subject:-0.5", "--seed", "11", "-n", "2",
        "--steps", "3", "--guidance", "3.5", "--scheduler", "euler-a", "--negative-prompt", "blurry",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "00000-11.json",
        "00000-11.png",
        "00001-12.json",
        "00001-12.png",
        "00002-sheet.json",
        "00002-sheet.png",
    ]
    text = read_png_parameters(out / "00001-12.png")
    prompt, negative, fields = text.split("\n")
    assert prompt == "a red circle <lora:style:0.7> <lora:subject:-0.5>"
    assert negative == "Negative prompt: blurry"
    for expected in ("Steps: 3", "Sampler: Euler a", "CFG scale: 3.5", "Seed: 12", "Size: 16x16"):
        assert expected in fields
    assert 'difflora adapters: "style:0.7:0.4,subject:-0.5:-0.5"' in fields
    sidecar = json.loads((out / "00001-12.json").read_text())
    assert sidecar["seed"] == 12 and sidecar["composition"] == "fused" and sidecar["parameters"] == text
    assert [(a["name"], a["weight"], a["te_weight"]) for a in sidecar["adapters"]] == [
        ("style", 0.7, 0.4),
        ("subject", -0.5, -0.5),
    ]
    assert Path(sidecar["adapters"][0]["file"]) == adapters / "style.safetensors"
    assert str(out / "00000-11.png") in output
    assert Image.open(out / "00002-sheet.png").width > 2 * 16
    code, _ = run(
        "generate", "a red circle", "--model", str(model), "--seed", "1", "--steps", "1", "--out", str(out)
    )
    assert code == 0 and (out / "00003-1.png").is_file()  # numbering continues, nothing overwritten


def test_sweep_renders_the_same_seed_in_every_cell(tmp_path, model_and_adapters):
    model, adapters = model_and_adapters
    common = ["--model", str(model), "--adapter-dir", str(adapters), "--seed", "5", "--steps", "2"]
    code, output = run(
        "generate", "a blue square", *common, "--sweep", "style:0,1", "--out", str(tmp_path / "sweep")
    )
    assert code == 0, output
    code, output = run("generate", "a blue square", *common, "--out", str(tmp_path / "base"))
    assert code == 0, output
    code, output = run(
        "generate", "a blue square", *common, "--adapters", "style:1", "--out", str(tmp_path / "one")
    )
    assert code == 0, output
    sweep = tmp_path / "sweep"
    assert np.array_equal(pixels(sweep / "00000-5.png"), pixels(tmp_path / "base" / "00000-5.png"))
    assert np.array_equal(pixels(sweep / "00001-5.png"), pixels(tmp_path / "one" / "00000-5.png"))
    assert not np.array_equal(pixels(sweep / "00000-5.png"), pixels(sweep / "00001-5.png"))
    assert "<lora:style:0>" in read_png_parameters(sweep / "00000-5.png")
    assert json.loads((sweep / "00002-sweep.json").read_text())["sweep"] == {"style": [0.0, 1.0]}


def count_calls(monkeypatch, function) -> list[tuple]:
    """Count `function`'s calls from every difflora module that holds it (imported since or before)."""
    calls: list[tuple] = []

    def counted(*args):
        calls.append(args)
        return function(*args)

    for module in [m for name, m in sys.modules.items() if name.startswith("difflora")]:
        if getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, counted)
    return calls


def test_a_generate_parses_its_adapters_and_sweep_once(tmp_path, model_and_adapters, monkeypatch):
    import difflora.config.spec as spec

    model, adapters = model_and_adapters
    adapter_specs = count_calls(monkeypatch, spec.parse_adapter_weights)
    sweeps = count_calls(monkeypatch, spec.parse_sweep)
    code, output = run(
        "generate", "x", "--model", str(model), "--adapter-dir", str(adapters), "--adapters", "style:0.5",
        "--sweep", "subject:0,1", "--steps", "1", "--seed", "0", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, output
    assert adapter_specs == [(("style:0.5",),)] and sweeps == [("subject:0,1",)]


def test_generate_with_a_composer_keeps_its_set_and_refuses_another_mode(tmp_path, model_and_adapters):
    from difflora.composition.composer import Composer
    from difflora.config.generate import GenerateConfig
    from difflora.generation.generate import generate
    from difflora.models.loading import load_pipeline

    model, adapters = model_and_adapters
    composer = Composer(load_pipeline(model))
    settings = {"prompt": "x", "adapter_dir": (str(adapters),), "steps": 1, "out": str(tmp_path)}
    generate(GenerateConfig(adapters=("style:0.5",), **settings), composer=composer)
    assert [str(a) for a in composer.adapters] == ["style:0.5"]  # the caller's composer holds the set
    with pytest.raises(ConfigError, match="--no-fuse"):
        generate(GenerateConfig(fuse=False, **settings), composer=composer)


def test_report_flag_writes_the_composition_report(tmp_path, model_and_adapters):
    model, adapters = model_and_adapters
    out = tmp_path / "out"
    code, output = run(
        "generate", "x", "--model", str(model), "--adapter-dir", str(adapters), "--adapters", "style:2,subject",
        "--steps", "1", "--seed", "0", "--report", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    report = (out / "composition-report.txt").read_text()
    assert "Composition of style:2, subject:1" in report and "OVER-DRIVEN" in report


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--adapters", "style:0.5:x"], ["Grammar: NAME[:WEIGHT[:TE_WEIGHT]]", "'x'"]),
        (["--adapters", "stlye:0.5"], ["Unknown adapter 'stlye'", "Closest: style", "subject"]),
        (["--sweep", "style=0,1"], ["Malformed --sweep"]),
        (["--scheduler", "euler_a", "--steps", "0"], ["--scheduler", "--steps"]),
    ],
)
def test_bad_requests_fail_cleanly_and_write_nothing(tmp_path, model_and_adapters, args, needles):
    model, adapters = model_and_adapters
    code, output = run(
        "generate",
        "x",
        "--model",
        str(model),
        "--adapter-dir",
        str(adapters),
        *args,
        "--out",
        str(tmp_path / "o"),
    )
    assert code != 0 and "Traceback" not in output
    for needle in needles:
        assert needle in output
    assert not list((tmp_path / "o").glob("*.png"))


def test_incompatible_adapter_is_refused_naming_both_models(tmp_path, model_and_adapters):
    model, _ = model_and_adapters
    pipe = tiny_pipeline(tmp_path)
    adapter = random_adapter(pipe, seed=0, unet=("to_q",))
    adapter.meta.base_architecture, adapter.meta.base_model = "sdxl-feedfacecafe", "my-sdxl"
    save_adapter(adapter, tmp_path / "xl.safetensors")
    code, output = run(
        "generate",
        "x",
        "--model",
        str(model),
        "--adapters",
        str(tmp_path / "xl.safetensors"),
        "--out",
        str(tmp_path),
    )
    assert code == 1
    assert "my-sdxl (sdxl-feedfacecafe)" in output and str(model) in output


def test_merge_and_inspect_commands(tmp_path, model_and_adapters):
    _, adapters = model_and_adapters
    merged = tmp_path / "merged.safetensors"
    code, output = run("merge", "style:0.7,subject:0.3", "-o", str(merged), "--adapter-dir", str(adapters))
    assert code == 0 and merged.is_file() and "Exact merge" in output, output
    code, output = run(
        "merge",
        "style:0.7",
        "subject:0.3",
        "-o",
        str(tmp_path / "r1.safetensors"),
        "--rank",
        "1",
        "--adapter-dir",
        str(adapters),
    )
    assert code == 0 and "SVD truncation" in output and "rank   4 -> 1" in output, output
    code, output = run(
        "inspect", str(adapters / "style.safetensors"), str(adapters / "subject.safetensors"), str(merged)
    )
    assert code == 0, output
    assert "Composition of style:1, subject:1, merged:1" in output and "style/subject" in output
    code, output = run("merge", "style", "-o", str(tmp_path / "m.pt"))
    assert code == 2 and "must end with .safetensors" in output


def test_a_composer_made_for_one_call_caches_updates_only_when_it_reweights(
    tmp_path, model_and_adapters, monkeypatch
):
    """The cache of computed updates (up to 2 GB) serves re-weighting between images; one weighting
    composes each update once, and the cache would only hold memory."""
    import difflora.generation.generate as module
    from difflora.composition.composer import DELTA_CACHE_BYTES, Composer
    from difflora.config.generate import GenerateConfig

    made: list[int] = []

    def spy(pipe, mode, *, delta_cache_bytes):
        made.append(delta_cache_bytes)
        return Composer(pipe, mode, delta_cache_bytes=delta_cache_bytes)

    monkeypatch.setattr(module, "Composer", spy)
    model, adapters = model_and_adapters
    settings = {"prompt": "x", "model": str(model), "adapter_dir": (str(adapters),), "steps": 1, "seed": 0}
    module.generate(GenerateConfig(adapters=("style:0.5",), out=str(tmp_path / "a"), **settings))
    module.generate(GenerateConfig(sweep=("style:0,1",), out=str(tmp_path / "b"), **settings))
    module.generate(
        GenerateConfig(adapters=("style",), compare=("subject,style",), out=str(tmp_path / "c"), **settings)
    )
    assert made == [0, DELTA_CACHE_BYTES, DELTA_CACHE_BYTES]
