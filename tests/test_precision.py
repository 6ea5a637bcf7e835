"""The plan warns before the first step when half precision will run on a CPU without its instructions
(oneDNN falls back to reference kernels there: ~100x slower convolutions, measured in precision.py)."""

from __future__ import annotations

import pytest
import torch

import difflora.training.precision as precision
import difflora.training.trainer as trainer
from tests.support.training import make_workspace, tiny_train_config


def test_the_probe_is_what_onednn_reports():
    assert precision.cpu_lacks_half_precision("bf16") == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert precision.cpu_lacks_half_precision("fp16") == (not torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert precision.cpu_lacks_half_precision("no") is False


@pytest.mark.parametrize("lacks", [True, False])
def test_the_note_names_the_precision_and_the_remedy_only_where_it_applies(monkeypatch, lacks):
    monkeypatch.setattr(precision, "cpu_lacks_half_precision", lambda name: lacks)
    note = precision.precision_note("bf16", torch.device("cpu"))
    if lacks:
        assert note is not None and note.startswith("bf16 on a CPU without bf16 instructions")
        assert "--mixed-precision no" in note
    else:
        assert note is None
    assert precision.precision_note("bf16", torch.device("cuda")) is None  # GPUs have their own kernels


@pytest.mark.parametrize(("mixed", "lacks", "noted"), [("bf16", True, True), ("no", True, False)])
def test_the_training_plan_carries_the_note(tmp_path, monkeypatch, mixed, lacks, noted):
    monkeypatch.setattr(precision, "cpu_lacks_half_precision", lambda name: lacks and name != "no")
    workspace = make_workspace(tmp_path / "data")
    config = tiny_train_config(
        workspace, tmp_path / "out", data="stripes", max_steps=1, save_every=0, mixed_precision=mixed
    )
    trainer.train(config, progress=False)
    plan = next((tmp_path / "out").glob("*.run/plan.txt")).read_text()
    assert ("note        bf16 on a CPU without bf16 instructions" in plan) == noted
