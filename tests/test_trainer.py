"""Training on a tiny kwargs-built model: outputs and metadata, bit-exact resume, the NaN guard, samples
that do not perturb training, and resume refusing changed settings. Each run is a few steps (seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difflora.training.loop as loop
import difflora.training.trainer as trainer
from difflora.config import parse_toml_text
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError, TrainingDivergedError
from difflora.formats.read import load_adapter
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from tests.support.training import make_workspace, tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved tiny model and an 8-image folder of the embedded world's style concept."""
    return make_workspace(tmp_path_factory.mktemp("train"))


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    """6 steps at batch 4 with a checkpoint every 2 steps, the latents cached once for the whole module."""
    run = dict(cache_dir=str(workspace / "cache"), batch_size=4, max_steps=6, save_every=2)
    return tiny_train_config(workspace, out, data="stripes", **(run | changes))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _losses(run_dir: Path) -> list[str]:
    with open(run_dir / "loss.csv", newline="") as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


def test_conv_targets_train_3x3_conv_lora(workspace, tmp_path):
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    adapter = load_adapter(trainer.train(_config(workspace, tmp_path, unet_targets=targets), progress=False))
    base = load_pipeline(str(workspace / "model"))
    convs = [n for n, _ in base.unet.named_modules() if n.endswith((".conv1", ".conv2")) and "resnets" in n]
    assert len(adapter.modules) == 14 * 4 + len(convs)
    assert adapter.modules["unet.down_blocks.0.resnets.0.conv1"].down.ndim == 4  # LoCon: a 3x3 conv LoRA


def test_train_writes_adapter_run_directory_and_metadata(workspace, tmp_path):
    path = trainer.train(_config(workspace, tmp_path, trigger="zebra"), progress=False)
    assert path == tmp_path / "stripes.safetensors"  # default name: the data folder's
    adapter = load_adapter(path)
    base = load_pipeline(str(workspace / "model"))
    # default targets on a full-size-style model: the 4 attention projections of its 14 attention layers
    assert adapter.components == ["unet"] and len(adapter.modules) == 14 * 4
    assert {key.rsplit(".", 1)[-1] for key in adapter.modules} == {"to_q", "to_k", "to_v", "0"}
    identity = model_identity(base)
    meta = adapter.meta
    assert (meta.base_hash, meta.base_architecture) == (identity.base_hash, identity.architecture)
    assert meta.trigger_words == ["zebra"]
    assert parse_toml_text(meta.config_toml)["rank"] == 8
    extra = meta.extra
    assert extra["difflora.train.steps"] == "6" and extra["difflora.train.num_train_images"] == "8"
    assert json.loads(extra["difflora.train.dataset_dirs"]) == {".": {"n_repeats": 1, "img_count": 8}}
    assert "zebra" in json.loads(extra["difflora.train.tag_frequency"])["."]
    assert len(extra["difflora.train.dataset_hash"]) == 64
    # The adapter really changed the UNet: B is no longer zero.
    assert any(float(w.up.abs().max()) > 0 for w in adapter.modules.values())
    run = tmp_path / "stripes.run"
    assert len(_losses(run)) == 6
    assert Image.open(run / "loss.png").size == (640, 360)
    assert parse_toml_text((run / "config.toml").read_text())["train"]["max_steps"] == 6
    assert "6 steps" in (run / "plan.txt").read_text()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004", "step-000006"]  # keep_checkpoints = 3
    final = _tensors(run / "checkpoints" / "step-000006" / "adapter.safetensors")
    assert all(torch.equal(final[k], v) for k, v in _tensors(path).items())
    # The file loads into diffusers unchanged (the PEFT layout).
    base.load_lora_weights(str(path))


def test_resumed_run_matches_uninterrupted_run_bit_for_bit(workspace, tmp_path, monkeypatch):
    straight = trainer.train(_config(workspace, tmp_path / "a", keep_checkpoints=5), progress=False)
    calls = {"n": 0}
    real = loop.step_loss

    def interrupted(batch, run, generator):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4, after the checkpoint at step 2... and step 3 done
            raise KeyboardInterrupt
        return real(batch, run, generator)

    monkeypatch.setattr(loop, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(workspace, tmp_path / "b", keep_checkpoints=5), progress=False)
    run_b = tmp_path / "b" / "stripes.run"
    assert not (tmp_path / "b" / "stripes.safetensors").exists()
    assert len(_losses(run_b)) == 3  # the interrupted run logged step 3 past its checkpoint
    monkeypatch.setattr(loop, "step_loss", real)
    resumed = trainer.train(
        _config(workspace, tmp_path / "b", keep_checkpoints=5, resume=True), progress=False
    )
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(run_b) == _losses(tmp_path / "a" / "stripes.run")  # the log reads as one run
    state_a = load_file(str(tmp_path / "a/stripes.run/checkpoints/step-000006/state.safetensors"))
    state_b = load_file(str(run_b / "checkpoints/step-000006/state.safetensors"))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a if not k.startswith("rng."))


def test_nan_guard_skips_steps_then_stops_with_advice_and_keeps_the_checkpoint(
    workspace, tmp_path, monkeypatch
):
    real = loop.step_loss
    calls = {"n": 0}

    def poisoned(batch, run, generator):
        calls["n"] += 1
        loss = real(batch, run, generator)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(loop, "step_loss", poisoned)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.train(_config(workspace, tmp_path, max_bad_steps=3), progress=False)
    message = str(caught.value)
    assert "not finite for 3 consecutive steps" in message
    assert "step-000002" in message and "--resume" in message and "--learning-rate" in message
    run = tmp_path / "stripes.run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "stripes.safetensors").exists()
    kept = load_adapter(run / "checkpoints" / "step-000002" / "adapter.safetensors")
    assert all(torch.isfinite(w.up).all() and torch.isfinite(w.down).all() for w in kept.modules.values())
    with open(run / "loss.csv", newline="") as handle:
        skipped = [row["skipped"] for row in csv.DictReader(handle)]
    assert skipped == ["0", "0", "1", "1", "1"]


def test_a_single_bad_step_is_skipped_and_training_continues(workspace, tmp_path, monkeypatch):
    real = loop.step_loss
    calls = {"n": 0}

    def one_nan(batch, run, generator):
        calls["n"] += 1
        loss = real(batch, run, generator)
        return loss + float("inf") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "step_loss", one_nan)
    path = trainer.train(_config(workspace, tmp_path, max_steps=3, save_every=0), progress=False)
    adapter = load_adapter(path)
    assert all(torch.isfinite(w.up).all() for w in adapter.modules.values())
    with open(tmp_path / "stripes.run" / "loss.csv", newline="") as handle:
        assert [row["skipped"] for row in csv.DictReader(handle)] == ["0", "1", "0"]


def test_samples_are_rendered_without_changing_training(workspace, tmp_path):
    plain = trainer.train(_config(workspace, tmp_path / "plain", max_steps=2, save_every=0), progress=False)
    sampled = trainer.train(
        _config(
            workspace,
            tmp_path / "sampled",
            max_steps=2,
            save_every=0,
            sample_every=1,
            sample_prompts=("zebrastripes style",),
            sample_seeds=(1, 2),
            sample_steps=2,
        ),
        progress=False,
    )
    a, b = _tensors(plain), _tensors(sampled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    samples = tmp_path / "sampled" / "stripes.run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-000001.png", "step-000002.png"]
    grid = np.asarray(Image.open(samples / "step-000002.png"))
    assert grid.shape[1] > 2 * 16  # two seed columns of 16-px images


def test_each_run_says_where_its_time_went(workspace, tmp_path):
    trainer.train(_config(workspace, tmp_path / "off", max_steps=2, save_every=1), progress=False)
    trainer.train(
        _config(workspace, tmp_path / "on", max_steps=2, save_every=0, sample_every=1, sample_steps=2),
        progress=False,
    )
    off = json.loads((tmp_path / "off" / "stripes.run" / "timing.json").read_text())
    on = json.loads((tmp_path / "on" / "stripes.run" / "timing.json").read_text())
    for times in (off, on):
        phases = [v for k, v in times.items() if k not in ("total", "peak_memory_mib")]
        assert times["steps"] > 0 and times["load"] > 0 and all(v >= 0 for v in phases)
        assert sum(phases) == pytest.approx(times["total"], abs=0.01)  # every second counted once
    assert off["previews"] == 0 and off["checkpoints"] > 0  # checkpoints at steps 1 and 2
    assert on["previews"] > 0  # grids at steps 1 and 2; the final checkpoint only
    # peak memory: the process's high-water mark, read here from the kernel another way (Linux)
    peak = on["peak_memory_mib"]
    high_water = _vm_hwm_mib()
    assert peak["rss"] <= high_water + 1 and set(peak["rss_after_phase"]) >= {"load", "caching", "steps"}
    assert peak["rss_after_phase"]["load"] <= peak["rss_after_phase"]["steps"] <= peak["rss"]
    plan = (tmp_path / "on" / "stripes.run" / "plan.txt").read_text()
    assert "  memory      est. peak " in plan and "+ activations " in plan


def _vm_hwm_mib() -> float:
    """VmHWM from /proc/self/status (kB): the same high-water mark ru_maxrss reports."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_resume_refuses_changed_settings_and_data(workspace, tmp_path):
    trainer.train(_config(workspace, tmp_path, max_steps=2, save_every=1), progress=False)
    with pytest.raises(ConfigError, match=r"rank: checkpoint 8, now 4"):
        trainer.train(_config(workspace, tmp_path, max_steps=2, rank=4, resume=True), progress=False)


def test_lr_schedule_shapes():
    from difflora.training.setup import lr_factor

    assert [lr_factor(s, kind="constant", warmup=4, total=10) for s in range(5)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
    ]
    assert lr_factor(4, kind="cosine", warmup=4, total=10) == 1.0
    assert lr_factor(7, kind="cosine", warmup=4, total=10) == pytest.approx(0.5)
    assert lr_factor(10, kind="cosine", warmup=4, total=10) == pytest.approx(0.0)
    assert lr_factor(7, kind="linear", warmup=4, total=10) == pytest.approx(0.5)


def test_text_encoder_lora_has_its_own_learning_rate(workspace, tmp_path):
    path = trainer.train(
        _config(
            workspace,
            tmp_path,
            max_steps=2,
            save_every=0,
            train_text_encoder=True,
            text_encoder_lr=0.0,  # frozen in effect: its B matrices must stay exactly zero
            gradient_accumulation=2,
            gradient_checkpointing=True,
        ),
        progress=False,
    )
    adapter = load_adapter(path)
    assert adapter.components == ["unet", "text_encoder"]
    text = adapter.component_modules("text_encoder")
    assert "text_model.encoder.layers.0.self_attn.q_proj" in text  # classic names in files
    assert all(float(w.up.abs().max()) == 0 for w in text.values())
    assert any(float(w.up.abs().max()) > 0 for w in adapter.component_modules("unet").values())
    assert "accumulation 2 = 8 images per step" in (tmp_path / "stripes.run" / "plan.txt").read_text()


def test_the_users_thread_count_is_respected_and_the_plan_says_why(workspace, tmp_path, monkeypatch):
    import difflora.training.threads as threads_module

    def no_probe(*args, **kwargs):
        raise AssertionError("the thread probe ran although OMP_NUM_THREADS was set")

    monkeypatch.setattr(threads_module, "fastest", no_probe)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what torch does at start-up with OMP_NUM_THREADS=1
    try:
        trainer.train(
            _config(workspace, tmp_path, num_threads=None, max_steps=1, save_every=0), progress=False
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    plan = (tmp_path / "stripes.run" / "plan.txt").read_text()
    assert "torch threads: 1 (OMP_NUM_THREADS=1" in plan


def test_prediction_type_override_trains_the_v_objective(workspace, tmp_path):
    path = trainer.train(
        _config(workspace, tmp_path, prediction_type="v_prediction", max_steps=1, save_every=0),
        progress=False,
    )
    meta = load_adapter(path).meta
    assert meta.prediction_type == "v_prediction"  # the base as trained: what generate must sample with
    assert "v_prediction" in (tmp_path / "stripes.run" / "plan.txt").read_text()


def test_gradient_norms_are_logged_per_layer(workspace, tmp_path):
    trainer.train(_config(workspace, tmp_path, max_steps=3, save_every=0, grad_log_every=1), progress=False)
    run_dir = tmp_path / "stripes.run"
    with open(run_dir / "gradients.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    layers = {row["layer"] for row in rows}
    assert {int(row["step"]) for row in rows} == {1, 2, 3} and len(rows) == 3 * len(layers)
    assert all(
        layer.startswith("unet.") and layer.endswith(("to_q", "to_k", "to_v", "to_out.0")) for layer in layers
    )
    first = [row for row in rows if row["step"] == "1"]
    # B starts at zero: on the first step A gets no gradient at all, while every B does
    assert all(float(row["grad_norm_a"]) == 0.0 and float(row["grad_norm_b"]) > 0 for row in first)
    later = [row for row in rows if row["step"] == "3"]
    assert all(float(row["grad_norm_a"]) > 0 for row in later)
    assert Image.open(run_dir / "gradients.png").size[1] == 4 * len(layers)


def test_layers_whose_gradients_vanish_or_explode_are_named(tmp_path):
    from difflora.training.gradients import GradientMonitor

    monitor = GradientMonitor({}, tmp_path, every=1, start_step=0)
    for step in range(1, 21):
        monitor.rows += [(step, f"unet.layer{i}", 1.0, 2.0) for i in range(8)]
        monitor.rows += [(step, "unet.dead", 0.0, 1e-9), (step, "unet.wild", 400.0, 900.0)]
    warnings = monitor.warnings(total_steps=20)
    assert len(warnings) == 2
    assert "vanishing" in warnings[0] and "unet.dead" in warnings[0] and "unet.layer" not in warnings[0]
    assert "exploding" in warnings[1] and "unet.wild" in warnings[1]


def test_several_folders_in_one_run_share_the_base_and_equal_separate_runs(workspace, tmp_path, monkeypatch):
    import difflora.training.setup as setup

    other = tmp_path / "circles"
    other.mkdir()
    for index, image in enumerate(sorted((workspace / "stripes").glob("*.png"))[:4]):
        Image.open(image).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(other / f"{index}.png")
        (other / f"{index}.txt").write_text("a flipped stripe")
    folders = [workspace / "stripes", other]
    separate = [
        trainer.train(
            _config(workspace, tmp_path / "apart", data_dir=str(d), max_steps=2, save_every=0), progress=False
        )
        for d in folders
    ]
    loads = []
    real_load = setup.load_pipeline
    monkeypatch.setattr(setup, "load_pipeline", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    together = trainer.train_many(
        [
            _config(workspace, tmp_path / "together", data_dir=str(d), max_steps=2, save_every=0)
            for d in folders
        ],
        progress=False,
    )
    assert len(loads) == 1  # one base for both adapters
    assert [p.name for p in together] == ["stripes.safetensors", "circles.safetensors"]
    for alone, shared in zip(separate, together, strict=True):
        a, b = _tensors(alone), _tensors(shared)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shared.name


def test_an_adapter_of_a_custom_architecture_exports_and_reads_back(workspace, tmp_path):
    from difflora.config.export import ExportConfig
    from difflora.formats.export import export_adapter

    path = trainer.train(_config(workspace, tmp_path, max_steps=1, save_every=0), progress=False)
    exported = export_adapter(ExportConfig(adapter=str(path), output=str(tmp_path / "kohya.safetensors")))
    back, trained = load_adapter(exported), load_adapter(path)
    assert set(back.modules) == set(trained.modules)  # read back whole, though no consumer ships this model


@pytest.mark.slow
def test_compile_trains_the_compiled_unet_to_the_same_adapter(workspace, tmp_path):
    """--compile: the UNet that trains is torch.compile's, and it learns what the eager one learns."""
    run = trainer.setup(_config(workspace, tmp_path / "compiled", max_steps=2, save_every=0, compile=True))
    assert type(run.unet).__name__ == "OptimizedModule"
    loop.run_loop(run)
    compiled = trainer.finish_run(run)
    eager = trainer.train(_config(workspace, tmp_path / "eager", max_steps=2, save_every=0), progress=False)
    a, b = _tensors(compiled), _tensors(eager)
    assert a.keys() == b.keys()
    first_compiled, first_eager = (
        float(_losses(d / "stripes.run")[0]) for d in (tmp_path / "compiled", tmp_path / "eager")
    )
    assert first_compiled == pytest.approx(first_eager, rel=1e-5)  # the same forward pass, rounded apart
    # Adam's first steps move by ~lr * sign(gradient), so rounding flips a few near-zero entries: close, not equal.
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < 0.02, worst
    assert any(
        k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a
    )  # it did train (B starts at 0)
