"""End to end on the embedded model: adapters trained on sample_data/ compose as a user would see it.

The two sample adapters are trained once per module with the trainer's Python API (a short run), then
composed at several weights with the same seeds throughout. `style:1` must show the style's signature
(horizontal stripes: `signatures.stripe_energy`), `subject:1` the subject's (a plus-shaped cross:
`signatures.cross_score`), both together both, and each signature must grow with its adapter's weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from difflora.compose import compose
from difflora.models import EMBEDDED_MODEL_DIR
from difflora.pipeline import render

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"
TRAIN_STEPS = 300  # short run; enough for both concepts to show (see the trainer's measured default run)
SEEDS = [0, 1, 2, 3]
STEPS = 20
STYLE_PROMPT = "a red circle on a white background, zebrastripes style"
SUBJECT_PROMPT = "a red crossglyph on a white background"
BOTH_PROMPT = "a red crossglyph on a white background, zebrastripes style"


def _missing() -> str | None:
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        return f"the embedded model is not built yet ({EMBEDDED_MODEL_DIR} has no model_index.json)"
    for name in ("style", "subject"):
        if not (SAMPLE_DATA / name).is_dir():
            return f"{SAMPLE_DATA / name} does not exist yet"
    return None


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from difflora.config.train import TrainConfig
    from difflora.trainer import train

    out = tmp_path_factory.mktemp("sample_adapters")
    for name in ("style", "subject"):
        config = TrainConfig(
            data_dir=str(SAMPLE_DATA / name),
            name=name,
            output_dir=str(out),
            max_steps=TRAIN_STEPS,
            save_every=0,
            sample_every=0,
            seed=0,
        )
        train(config, progress=False)
    return out


@pytest.fixture(scope="module")
def pipe(adapter_dir):  # adapter_dir first: it skips when the model or the data are missing
    from difflora.models import load_pipeline

    return load_pipeline(None)


def measure(pipe, adapter_dir: Path, spec: str, prompt: str, measure_fn) -> float:
    from difflora.embedded import signatures

    compose(pipe, spec, adapter_dirs=[adapter_dir])
    images = render(pipe, [prompt] * len(SEEDS), seeds=SEEDS, steps=STEPS)
    return float(np.mean([getattr(signatures, measure_fn)(image) for image in images]))


def test_style_signature_appears_and_grows_with_its_weight(pipe, adapter_dir):
    from difflora.embedded.signatures import STRIPE_THRESHOLD

    energy = [measure(pipe, adapter_dir, f"style:{w}", STYLE_PROMPT, "stripe_energy") for w in (0, 0.5, 1)]
    assert energy[0] < STRIPE_THRESHOLD < energy[2], energy
    assert energy[0] < energy[1] < energy[2], energy


def test_subject_signature_appears_and_grows_with_its_weight(pipe, adapter_dir):
    from difflora.embedded.signatures import CROSS_THRESHOLD

    score = [measure(pipe, adapter_dir, f"subject:{w}", SUBJECT_PROMPT, "cross_score") for w in (0, 0.5, 1)]
    assert score[0] < CROSS_THRESHOLD < score[2], score
    assert score[0] < score[1] < score[2], score


def test_both_adapters_together_show_both_signatures(pipe, adapter_dir):
    from difflora.embedded.signatures import CROSS_THRESHOLD, STRIPE_THRESHOLD

    spec = "style:1,subject:1"
    assert measure(pipe, adapter_dir, spec, BOTH_PROMPT, "stripe_energy") > STRIPE_THRESHOLD
    assert measure(pipe, adapter_dir, spec, BOTH_PROMPT, "cross_score") > CROSS_THRESHOLD
    base_stripes = measure(pipe, adapter_dir, "", BOTH_PROMPT, "stripe_energy")
    base_cross = measure(pipe, adapter_dir, "", BOTH_PROMPT, "cross_score")
    assert base_stripes < STRIPE_THRESHOLD and base_cross < CROSS_THRESHOLD
