"""Adaptive rank (--adaptive-rank, peft AdaLoRA) on the embedded model. A short run with an aggressive
schedule (pruning from step 1, every step) must leave modules of different ranks below the initial one; the
saved adapter and its exports must hold, module by module, exactly the update the trained SVD layers apply,
computed here by hand from the checkpoint's raw A, E, B: (alpha/rank) · B·diag(E)·A · r0/(r0 + 1e-5), r0
the initial rank (peft divides by its ranknum, the initial rank, plus 1e-5). It composes with an ordinary
adapter as W0 + w1·ΔW1 + w2·ΔW2, generates, resumes bit for bit, and runs end to end from the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import difflora.training.loop as loop
from difflora.composition.composer import compose
from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.spec import parse_adapter_weights
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.formats.export import export_adapter
from difflora.formats.native import save_adapter
from difflora.formats.read import load_adapter
from difflora.generation.generate import generate
from difflora.models.loading import load_pipeline
from difflora.training.checkpoint import latest_checkpoint, load_checkpoint
from difflora.training.trainer import train
from tests.support.adapters import effective_forward_error, random_adapter, read_file_deltas
from tests.support.cli import run_cli
from tests.support.paths import SAMPLE_DATA
from tests.support.variants import ALPHA, RANK, variant_config

INIT_RANK = 6


def _config(out: Path, cache_dir: Path, **changes) -> TrainConfig:
    adaptive = dict(
        max_steps=6,
        unet_targets=None,  # the embedded model's default targets, convolutions included
        adaptive_rank=True,
        adaptive_warmup=0.0,  # prune from the first step (every step: the default interval is 1% of 6)
        train_text_encoder=True,
    )
    return variant_config(out, cache_dir, **(adaptive | changes))


def _raw_svd(run_dir: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """module ("<component>.<live name>") -> (rank, ΔW flattened to [out, in·k·k]) from the final
    checkpoint's raw AdaLoRA parameters: rank = components with E != 0."""
    parameters = load_checkpoint(latest_checkpoint(run_dir / "checkpoints")).parameters
    result = {}
    for key, a in parameters.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b, e = (
            parameters[key.replace(".lora_A.", ".lora_B.")],
            parameters[key.replace(".lora_A.", ".lora_E.")],
        )
        assert a.shape[0] == INIT_RANK and e.shape == (INIT_RANK, 1)
        delta = (ALPHA / RANK) * (b.double() @ (a.double() * e.double())) * INIT_RANK / (INIT_RANK + 1e-5)
        result[module] = (int((e != 0).sum()), delta)
    return result


def _live(file_key: str) -> str:
    """A file's module key -> the live name the checkpoint uses (transformers 5 has no text_model. level)."""
    return file_key.replace("text_encoder.text_model.", "text_encoder.")


def _kohya(live: str) -> str:
    """A live module key -> its kohya name (lora_unet_..., lora_te_text_model_...)."""
    component, _, name = live.partition(".")
    if component == "unet":
        return "lora_unet_" + name.replace(".", "_")
    return "lora_te_" + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")


def _kohya_deltas(path: Path) -> dict[str, torch.Tensor]:
    """kohya module name -> alpha/rank · up @ down ([out, in·k·k]), read straight from the file."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).double() for key in handle.keys()}  # noqa: SIM118
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up, alpha = tensors[f"{name}.lora_up.weight"], float(tensors[f"{name}.alpha"])
            deltas[name] = alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))
    return deltas


# The 6-step adaptive training with its text encoder (half a minute here) and what is checked on it are
# end-to-end: slow, beside the CLI and resume runs.
@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_cache) -> tuple[Path, dict[str, tuple[int, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("adaptive")
    path = train(_config(out, sample_cache), progress=False)
    return path, _raw_svd(out / "style.run")


@pytest.mark.slow
def test_ranks_are_pruned_per_module_to_the_target_average(trained):
    path, raw = trained
    ranks = {module: rank for module, (rank, _) in raw.items()}
    assert set(ranks.values()) != {INIT_RANK} and len(set(ranks.values())) > 2  # pruned, and unevenly
    for component in ("unet", "text_encoder"):
        own = [r for m, r in ranks.items() if m.startswith(component + ".")]
        assert own and sum(own) == RANK * len(own)  # each component's budget: an average of --rank
    adapter = load_adapter(path)
    assert {_live(k): w.rank for k, w in adapter.modules.items()} == {m: r for m, r in ranks.items() if r}
    summary = json.loads(adapter.meta.extra["difflora.train.adaptive_ranks"])
    assert summary["unet"]["mean"] == RANK and summary["unet"]["max"] <= INIT_RANK
    assert "AdaLoRA" in (path.parent / "style.run" / "plan.txt").read_text()


@pytest.mark.slow
def test_saved_and_exported_updates_equal_the_trained_svd_update(trained, tmp_path):
    path, raw = trained
    expected = {m: delta for m, (rank, delta) in raw.items() if rank}
    assert any(m.endswith(".conv1") for m in expected)  # SVDConv2d layers too (the tiny model's targets)
    assert all(delta.abs().max() == 0 for rank, delta in raw.values() if rank == 0)  # left out: ΔW is 0

    def same(found: dict[str, torch.Tensor], rename) -> None:
        assert {rename(k) for k in found} == set(expected)
        for key, delta in found.items():
            want = expected[rename(key)]
            torch.testing.assert_close(delta.double().flatten(1), want, rtol=1e-4, atol=1e-7)

    same(read_file_deltas(path), _live)
    diffusers = export_adapter(
        ExportConfig(
            adapter=str(path), output=str(tmp_path / "d.safetensors"), format="diffusers", dtype="fp32"
        )
    )
    same(read_file_deltas(diffusers), _live)
    kohya = export_adapter(
        ExportConfig(adapter=str(path), output=str(tmp_path / "k.safetensors"), dtype="fp32")
    )
    convs = [w for k, w in load_adapter(kohya).modules.items() if k.endswith(".conv1")]
    assert convs and all(w.down.ndim == 4 and w.down.shape[2:] == (3, 3) for w in convs)
    names = {_kohya(m): m for m in expected}
    same(_kohya_deltas(kohya), lambda name: names.get(name, name))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fused", "dynamic"])
def test_composes_with_an_ordinary_adapter_exactly(trained, tmp_path, mode):
    path, raw = trained
    pipe = load_pipeline(None)
    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(path, folder / "ada.safetensors")
    plain = random_adapter(pipe, seed=3, unet=("to_q", "conv1"), rank=2, alpha=1.0, name="plain")
    save_adapter(plain, folder / "plain.safetensors")
    # A Linear and a 3x3 conv that both adapters adapt, pruned below the initial rank but not to 0.
    picks = [
        next(m for m, (r, _) in raw.items() if m.startswith("unet.") and m.endswith(s) and 0 < r < INIT_RANK)
        for s in (".to_q", ".conv1")
    ]
    modules = [m.removeprefix("unet.") for m in picks]
    base = {m: pipe.unet.get_submodule(m).weight.detach().double().clone() for m in modules}
    compose(pipe, parse_adapter_weights("ada:0.7,plain:-0.4"), mode=mode, adapter_dirs=[folder])
    for module in modules:
        _, delta = raw[f"unet.{module}"]
        mine = plain.modules[f"unet.{module}"]
        plain_delta = (mine.alpha / mine.rank) * (mine.up.double().flatten(1) @ mine.down.double().flatten(1))
        want = (base[module].flatten(1) + 0.7 * delta - 0.4 * plain_delta).reshape(base[module].shape)
        layer = pipe.unet.get_submodule(module)
        if mode == "fused":
            torch.testing.assert_close(layer.weight.double(), want, rtol=1e-5, atol=1e-6)
        else:
            assert effective_forward_error(layer, want) < 1e-4


@pytest.mark.slow
def test_generates_with_the_adapter(trained, tmp_path):
    path, _ = trained
    settings = GenerateConfig(
        prompt="a red circle, zebrastripes style", adapters=(f"{path}:1",), steps=2, seed=1,
        out=str(tmp_path / "images"),
    )  # fmt: skip
    assert np.asarray(Image.open(generate(settings)[0])).shape == (64, 64, 3)


@pytest.mark.slow
def test_resumed_run_prunes_and_trains_bit_for_bit_like_an_uninterrupted_one(
    tmp_path, monkeypatch, sample_cache
):
    cache = sample_cache
    changes = dict(save_every=2, keep_checkpoints=5, train_text_encoder=False)
    straight = train(_config(tmp_path / "a", cache, **changes), progress=False)
    calls, real = {"n": 0}, loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4: past the checkpoint of step 2, with ranks pruned at steps 1-3
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "b", cache, **changes), progress=False)
    monkeypatch.setattr(loop, "step_loss", real)
    with pytest.raises(ConfigError, match="--adaptive-rank prunes ranks on a schedule"):
        train(_config(tmp_path / "b", cache, **changes, max_steps=8, resume=True), progress=False)
    resumed = train(_config(tmp_path / "b", cache, **changes, resume=True), progress=False)
    a, b = load_adapter(straight).modules, load_adapter(resumed).modules
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"conv_rank": 2}, "--conv-rank: cannot be combined with --adaptive-rank"),
        ({"rslora": True}, "--rslora: cannot be combined with --adaptive-rank"),
        ({"dora": True}, "--dora: cannot be combined with --adaptive-rank"),
        ({"loraplus_ratio": 16.0}, "--loraplus-ratio: cannot be combined with --adaptive-rank"),
        ({"adaptive_init_rank": 4}, "--adaptive-init-rank: must be above --rank (4)"),
        ({"adaptive_warmup": 0.5, "adaptive_final": 0.5}, "leave no steps to prune ranks in"),
        ({"adaptive_rank": False, "adaptive_final": 0.3}, "--adaptive-final: given without --adaptive-rank"),
    ],
)
def test_settings_peft_adalora_cannot_honour_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, tmp_path, **changes)
    assert message in str(error.value)


@pytest.mark.slow
def test_cli_trains_generates_and_exports(tmp_path, sample_cache):
    out = tmp_path / "adapters"
    trained = run_cli(
        ["train", str(SAMPLE_DATA / "style"), "--output-dir", str(out), "--max-steps", "4", "--rank", "2",
         "--adaptive-rank", "--adaptive-warmup", "0", "--sample-every", "0", "--num-threads", "1",
         "--cache-dir", str(sample_cache)]
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "adaptive rank (from 3): unet" in trained.stderr and "mean 2" in trained.stderr
    images = tmp_path / "images"
    generated = run_cli(
        ["generate", "a red circle", "--adapters", "style:0.8", "--adapter-dir", str(out), "--steps", "2",
         "--out", str(images)]
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert len(list(images.glob("*.png"))) == 1
    exported = run_cli(
        ["export", str(out / "style.safetensors"), "--output", str(tmp_path / "style.kohya.safetensors")]
    )
    assert exported.returncode == 0, exported.stderr
    ranks = {w.rank for w in load_adapter(tmp_path / "style.kohya.safetensors").modules.values()}
    assert len(ranks) > 1 and max(ranks) <= 3
