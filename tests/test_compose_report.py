"""The composition report's numbers against full ΔW matrices computed here, and its over-drive warning."""

from __future__ import annotations

import itertools

import pytest
import torch

from difflora.adapter.types import Adapter, LoraWeights
from difflora.composition.report import OVERDRIVE, composition_report
from difflora.config.spec import parse_adapter_weights
from tests.support.adapters import random_adapter


def full_delta(weights: LoraWeights) -> torch.Tensor:
    return (weights.alpha / weights.rank) * weights.up.double().flatten(1) @ weights.down.double().flatten(1)


def test_report_matches_full_matrix_computation(pipeline):
    a = random_adapter(pipeline, seed=1, unet=("to_q", "to_k"), te=("q_proj",), rank=4, alpha=2.0)
    b = random_adapter(pipeline, seed=2, unet=("to_k", "to_v"), te=("q_proj",), rank=2, alpha=8.0)
    specs = parse_adapter_weights("a:0.7:0.2,b:-1.5")
    report = composition_report(list(zip(specs, [a, b], strict=True)))
    assert {layer.module for layer in report.layers} == set(a.modules) | set(b.modules)
    for layer in report.layers:
        component = layer.module.partition(".")[0]
        here = [
            (s, ad.modules[layer.module])
            for s, ad in zip(specs, [a, b], strict=True)
            if layer.module in ad.modules
        ]
        deltas = [full_delta(w) for _, w in here]
        weights = [s.weight_for(component) for s, _ in here]
        composed = sum(w * d for w, d in zip(weights, deltas, strict=True))
        assert layer.weights == pytest.approx(weights)
        assert layer.composed_norm == pytest.approx(float(composed.norm()), rel=1e-9)
        for i, delta in enumerate(deltas):
            assert layer.norms[i] == pytest.approx(float(delta.norm()), rel=1e-9)
            assert layer.relative_norm(i) == pytest.approx(float(composed.norm() / delta.norm()), rel=1e-9)
            drive = float((composed * delta).sum() / (delta * delta).sum())
            assert layer.drives[i] == pytest.approx(drive, rel=1e-9)
        for i, j in itertools.combinations(range(len(deltas)), 2):
            cosine = float((deltas[i] * deltas[j]).sum() / (deltas[i].norm() * deltas[j].norm()))
            assert layer.cosines[(layer.adapters[i], layer.adapters[j])] == pytest.approx(cosine, abs=1e-9)
    assert "a/b:" in report.text() and "cosine" in report.text()


def _single_module(up: torch.Tensor, down: torch.Tensor, alpha: float = 1.0) -> Adapter:
    return Adapter({"unet.x.to_q": LoraWeights(down=down, up=up, alpha=alpha)})


def test_aligned_adapters_overdrive_and_orthogonal_ones_do_not():
    down = torch.eye(2, 6)
    up = torch.eye(4, 2)
    same = _single_module(up, down)
    other = _single_module(torch.eye(4, 2).roll(2, dims=0), torch.eye(2, 6).roll(2, dims=1))
    aligned = composition_report(list(zip(parse_adapter_weights("a:1,b:1"), [same, same], strict=True)))
    layer = aligned.layers[0]
    assert layer.cosines[("a", "b")] == pytest.approx(1.0) and layer.drives == pytest.approx((2.0, 2.0))
    assert layer.overdriven == ["a", "b"] and len(aligned.warnings) == 2
    assert "drives 'a' at 2.00x" in aligned.warnings[0] and "OVER-DRIVEN" in aligned.text()
    orthogonal = composition_report(list(zip(parse_adapter_weights("a:1,b:1"), [same, other], strict=True)))
    layer = orthogonal.layers[0]
    assert layer.cosines[("a", "b")] == pytest.approx(0.0) and layer.drives == pytest.approx((1.0, 1.0))
    assert layer.relative_norm(0) == pytest.approx(2**0.5) and not orthogonal.warnings
    boosted = composition_report([(parse_adapter_weights(f"a:{OVERDRIVE + 0.1}")[0], same)])
    assert boosted.warnings and boosted.layers[0].drives[0] == pytest.approx(OVERDRIVE + 0.1)


def test_composer_report_uses_the_current_weights(pipeline):
    from difflora.composition.composer import compose

    composer = compose(pipeline)
    adapter = random_adapter(pipeline, seed=1, unet=("to_q",))
    composer.add(adapter, 1.0, name="a")
    composer.add(adapter, 1.0, name="b")
    assert all(layer.drives == pytest.approx((2.0, 2.0)) for layer in composer.report().layers)
    composer.set_weights(parse_adapter_weights("a:0.5,b:0.5"))
    assert not composer.report().warnings
