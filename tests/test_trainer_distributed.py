"""The same `difflora train` command under `accelerate launch` with 2 CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from difflora.formats.read import load_adapter
from tests.support.models import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_accelerate_run(tmp_path):
    from difflora.embedded.shapes import style_batch

    tiny_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "model")
    images, captions = style_batch(1, 12)
    data = tmp_path / "stripes"
    data.mkdir()
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(pixels).resize((16, 16)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(caption)
    # On CPU, accelerate's --multi_gpu launcher (torchrun) is what starts N processes; difflora then selects
    # gloo itself. `--cpu --num_processes N` would need mpirun.
    launcher = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
    ]
    command = [*launcher, "--main_process_port", "29517", "-m", "difflora", "train", str(data)]
    command += ["--model", str(tmp_path / "model"), "--resolution", "16", "--max-steps", "4"]
    command += ["--save-every", "2", "--sample-every", "0", "--output-dir", str(tmp_path / "out")]
    command += [
        "--validation-split",
        "0.25",
        "--keep-best",
    ]  # every process validates: collectives stay matched
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Adapter:") == 1  # one voice
    adapter = load_adapter(tmp_path / "out" / "stripes.safetensors")
    assert adapter.meta.extra["difflora.train.batch_size"] == "8"  # 4 per process x 2 processes
    run = tmp_path / "out" / "stripes.run"
    assert "x 2 process(es)" in (run / "plan.txt").read_text()
    assert len((run / "loss.csv").read_text().strip().splitlines()) == 1 + 4
    state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())
    assert [key for key, _ in state["rng"]["__dict__"]] == ["0", "1"]  # both processes RNG states
    assert (tmp_path / "out" / "stripes.best.safetensors").is_file()
    assert (
        result.stderr.count("validation: lowest loss") + result.stdout.count("validation: lowest loss") == 1
    )
