"""Training features on a tiny in-process Flux (tests/support/flux.py): an interrupted run resumes bit for
bit like an uninterrupted one, cached text encoders are freed before the first step (samples still
render), and the ε/v-only settings (--min-snr-gamma, --noise-offset) given for a
flow-matching family warn in one line and stay out of the plan. Each run is a few steps (seconds)."""

from __future__ import annotations

import csv
import dataclasses
import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difflora.training.loop as loop
import difflora.training.trainer as trainer
from difflora.config.train import TrainConfig
from difflora.models.loading import load_pipeline
from difflora.training.outputs import finish_run
from tests.support.flux import tiny_flux_pipeline
from tests.support.paths import copy_samples


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved tiny Flux and 4 images of the style concept."""
    root = tmp_path_factory.mktemp("flux-train")
    tiny_flux_pipeline(max_tokens=32).save_pretrained(root / "model")
    copy_samples("style", root / "style", range(4))
    return root


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(
        data_dir=str(workspace / "style"),
        model=str(workspace / "model"),
        output_dir=str(out),
        cache_dir=str(workspace / "cache"),
        max_steps=6,
        save_every=2,
        keep_checkpoints=5,
        batch_size=2,
        resolution=32,
        rank=4,
        learning_rate=1e-2,
        sample_every=0,
        grad_log_every=0,
        num_threads=1,
        seed=7,
    )
    return TrainConfig(**(settings | changes))


def _losses(run_dir: Path) -> list[str]:
    with open(run_dir / "loss.csv", newline="") as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


def test_an_interrupted_flux_run_resumes_bit_for_bit(workspace, tmp_path, monkeypatch):
    straight = trainer.train(_config(workspace, tmp_path / "a"), progress=False)
    calls = {"n": 0}
    real = loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: the checkpoint of step 2 exists, step 3 is done
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(workspace, tmp_path / "b"), progress=False)
    run_b = tmp_path / "b" / "style.run"
    assert not (tmp_path / "b" / "style.safetensors").exists() and len(_losses(run_b)) == 3
    monkeypatch.setattr(loop, "step_loss", real)
    resumed = trainer.train(_config(workspace, tmp_path / "b", resume=True), progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    assert any(bool(a[k].abs().max() > 0) for k in a if "lora_B" in k or "lora_up" in k)  # it trained
    assert _losses(run_b) == _losses(tmp_path / "a" / "style.run")  # the log reads as one run
    state_a = load_file(str(tmp_path / "a/style.run/checkpoints/step-000006/state.safetensors"))
    state_b = load_file(str(run_b / "checkpoints/step-000006/state.safetensors"))
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a if not k.startswith("rng."))


def test_eps_only_settings_warn_once_for_flow_matching_and_stay_out_of_the_plan(workspace, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="difflora"):
        trainer.train(
            _config(workspace, tmp_path, max_steps=1, min_snr_gamma=3.0, noise_offset=0.1), progress=False
        )
    lines = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("--min-snr-gamma 3 and --noise-offset 0.1: not applied")
    assert "flow matching" in lines[0]
    plan = (tmp_path / "style.run" / "plan.txt").read_text()
    assert "min-SNR" not in plan and "noise offset" not in plan and "flow matching, timesteps" in plan
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="difflora"):
        trainer.train(_config(workspace, tmp_path / "plain", max_steps=1), progress=False)
    assert not [r for r in caplog.records if "not applied" in r.getMessage()]


def _setup_and_train(config: TrainConfig, pipe, *, keep_base: bool, before_loop=None) -> Path:
    """trainer.train's steps for one run on an already loaded base (`keep_base`: as if a later run shared
    it, which keeps its text encoders), with a look at the run before its first step."""
    run = trainer.setup(config, progress=False, pipe=pipe, keep_base=keep_base)
    if before_loop is not None:
        before_loop(run)
    try:
        loop.run_loop(run)
        finish_run(run)
    finally:
        run.log.close()
    return run.paths.samples


def test_cached_text_encoders_are_freed_before_the_first_step_and_samples_still_render(workspace, tmp_path):
    """Text embeddings cached, encoders not trained: no module of either text encoder is alive once set-up
    is done (weak references die), yet the sample grids render, from the sample prompts encoded before
    freeing, the same as a run that kept its encoders renders them from the prompts."""
    config = _config(
        workspace, tmp_path / "freed", max_steps=2, save_every=0, sample_every=1, sample_seeds=(1,)
    )
    pipe = load_pipeline(workspace / "model")
    encoders = [getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")]
    alive = [weakref.ref(module) for encoder in encoders for module in encoder.modules()]
    del encoders
    looked = {}

    def look(run) -> None:
        gc.collect()
        looked["alive"] = sum(ref() is not None for ref in alive)
        looked["pipe"] = (run.models.pipe.text_encoder, run.models.pipe.text_encoder_2, run.text_encoders)

    freed = _setup_and_train(config, pipe, keep_base=False, before_loop=look)
    assert looked == {"alive": 0, "pipe": (None, None, {})}
    kept_config = dataclasses.replace(config, output_dir=str(tmp_path / "kept"))
    kept = _setup_and_train(kept_config, load_pipeline(workspace / "model"), keep_base=True)
    for name in ("step-000001.png", "step-000002.png"):
        a = np.asarray(Image.open(freed / name), dtype=np.int16)
        b = np.asarray(Image.open(kept / name), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, name  # batched vs one-by-one encoding
