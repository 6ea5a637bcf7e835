"""`difflora serve` composes LyCORIS adapters and per-block weights as `difflora generate` does: a request
composing a LoKr, a LoHa and a LoRA, and one with per-block weights, are rendered (through the HTTP app, as
tests/test_serve.py drives it) with W0 + Σ wᵢ·fᵢ(block)·ΔWᵢ, every ΔWᵢ from the files' tensors by the
published formulas (tests/support/lycoris.py) and every block factor fᵢ by hand."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from difflora.config.spec import parse_adapter_weights
from difflora.models.loading import load_pipeline
from difflora.serving.app import create_app
from difflora.serving.engine import Engine
from tests.support.lycoris import expected_delta, full_tensors, loha_tensors, lokr_tensors
from tests.test_lycoris_compose import (
    CONV,
    OUT,
    SHAPES,
    SPEC,
    TE,
    K,
    Q,
    kohya,
    lora_delta,
    lora_tensors,
    weights_of,
)

# The embedded UNet's SGM blocks by hand (layers_per_block 1; conv_in is IN00, down_blocks.0's layer IN01; each
# up block has 2 layers: up_blocks.1's first is OUT02); the text encoder is BASE.
BLOCKS = {Q: "IN01", OUT: "IN01", CONV: "IN01", K: "OUT02", TE: "BASE"}
BLOCK_SPEC = "lokr:0.7:0.4@in=0.5,base=2,loha:-0.5@IN01=3,in=0,lora:1.2@OUT02=0.25,mid=2,base=0"
FACTORS = {  # each adapter's factor per block by the grammar's rules (a block beats its group; unnamed: 1)
    "lokr": {"IN01": 0.5, "OUT02": 1.0, "BASE": 2.0},
    "loha": {"IN01": 3.0, "OUT02": 1.0, "BASE": 1.0},
    "lora": {"IN01": 1.0, "OUT02": 0.25, "BASE": 0.0},
}


@pytest.fixture(scope="module")
def files() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "lokr": lokr_tensors(kohya(Q), SHAPES[Q], layout="lowrank-lowrank", seed=1)
        | lokr_tensors(kohya(CONV), SHAPES[CONV], layout="tucker", seed=2)
        | lokr_tensors(kohya(TE), SHAPES[TE], layout="full-lowrank", seed=3),
        "loha": loha_tensors(kohya(Q), SHAPES[Q], seed=4)
        | loha_tensors(kohya(CONV), SHAPES[CONV], tucker=True, seed=5)
        | full_tensors(kohya(OUT), SHAPES[OUT], bias=True, seed=6),
        "lora": lora_tensors(Q, 4, 2.0, 7) | lora_tensors(K, 2, 8.0, 8) | lora_tensors(TE, 4, 4.0, 9),
    }


@pytest.fixture(scope="module")
def client(tmp_path_factory, files):
    adapters = tmp_path_factory.mktemp("serve_lycoris")
    for name, tensors in files.items():
        save_file(tensors, adapters / f"{name}.safetensors")
    pipe = load_pipeline(None)
    base = weights_of(pipe)  # W0, before any request composes
    engine = Engine(pipe, adapter_dir=[str(adapters)])
    with TestClient(create_app(engine)) as test_client:
        yield test_client, engine, base


def expected(base: dict[str, torch.Tensor], files: dict, spec: str, factors: dict | None) -> dict:
    """module (or module + ".bias") -> W0 + Σ wᵢ fᵢ ΔWᵢ in float64 (fᵢ = 1 without `factors`)."""
    result = {key: value.double().clone() for key, value in base.items()}
    for entry in parse_adapter_weights(spec):
        tensors = files[entry.name]
        for key, shape in SHAPES.items():
            weight = entry.weight if key.startswith("unet.") else entry.text_encoder_weight
            weight *= factors[entry.name][BLOCKS[key]] if factors else 1.0
            if f"{kohya(key)}.lora_down.weight" in tensors:
                result[key] += weight * lora_delta(tensors, key)
            elif any(k.startswith(kohya(key) + ".") for k in tensors):
                result[key] += weight * expected_delta(tensors, kohya(key), shape)
            if f"{kohya(key)}.diff_b" in tensors:
                result[key + ".bias"] += weight * tensors[f"{kohya(key)}.diff_b"].double()
    return result


@pytest.mark.parametrize(("spec", "factors"), [(SPEC, None), (BLOCK_SPEC, FACTORS)], ids=["plain", "blocks"])
def test_a_request_is_rendered_with_the_exact_composition(client, files, spec, factors):
    test_client, engine, base = client
    response = test_client.post(
        "/generate", json={"prompt": "a red circle", "adapters": spec, "seed": 3, "steps": 1}
    )
    assert response.status_code == 200, response.text
    seen = weights_of(engine.pipe)  # the request's set stays composed until the next request
    want = expected(base, files, spec, factors)
    assert set(seen) == set(want)
    for key, value in want.items():
        assert torch.allclose(seen[key].double(), value, rtol=1e-5, atol=1e-6), key
    if factors:  # the hand factors differ from 1 where it matters: a plain composition would fail above
        assert FACTORS["lora"]["BASE"] == 0 and not torch.equal(
            want[TE], expected(base, files, spec, None)[TE]
        )


def test_a_request_naming_a_block_the_model_lacks_is_a_422_naming_it(client):
    test_client, _, _ = client
    body = {"prompt": "x", "adapters": "lora:1@OUT09=0", "steps": 1}
    response = test_client.post("/generate", json=body)
    assert response.status_code == 422 and "'OUT09' names no block" in response.json()["error"], response.text
    assert test_client.get("/health").status_code == 200
